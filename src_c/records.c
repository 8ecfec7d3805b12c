/* records.c -- the byte-moving loops: copy, gather and CRC-32C. */
#include "embfile.h"
#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EMB_X86 1
#endif

#define COPY_STEP ((size_t)1 << 20)

#ifdef EMB_X86
/* 32-byte aligned stores, unaligned loads: full speed whatever the source's
 * alignment relative to the destination's. */
__attribute__((target("avx2"))) static void copy_avx2(uint8_t *dst,
                                                       const uint8_t *src,
                                                       size_t n) {
    size_t head = (32 - ((uintptr_t)dst & 31)) & 31, i;
    memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    for (i = 0; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
        _mm256_store_si256((__m256i *)(dst + i), a);
        _mm256_store_si256((__m256i *)(dst + i + 32), b);
        _mm256_store_si256((__m256i *)(dst + i + 64), c);
        _mm256_store_si256((__m256i *)(dst + i + 96), d);
    }
    memcpy(dst + i, src + i, n - i);
}

static int have_avx2(void) {
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    return known;
}
#endif

void emb_copy(uint8_t *dst, const uint8_t *src, size_t n) {
    size_t step;
#ifdef EMB_X86
    if (n >= 256 && have_avx2()) {
        copy_avx2(dst, src, n);
        return;
    }
#endif
    for (; n > 0; dst += step, src += step, n -= step) {
        step = n < COPY_STEP ? n : COPY_STEP;
        memcpy(dst, src, step);
    }
}

/* The address of global row `row`, or NULL past the last shard. */
static inline const uint8_t *locate(const uint8_t *const *bases,
                                    const uint64_t *starts, size_t n_shards,
                                    uint64_t record_bytes, uint64_t row) {
    size_t lo = 0, hi = n_shards; /* the shard with starts[lo] <= row < starts[lo+1] */
    if (row >= starts[n_shards])
        return NULL;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (starts[mid] <= row)
            lo = mid;
        else
            hi = mid;
    }
    return bases[lo] + (row - starts[lo]) * record_bytes;
}

int emb_gather(const uint8_t *const *bases, const uint64_t *starts,
               size_t n_shards, uint64_t record_bytes, const uint64_t *rows,
               size_t k, uint8_t *dst) {
    size_t i;
    for (i = 0; i < k; i++) {
        const uint8_t *src =
            locate(bases, starts, n_shards, record_bytes, rows[i]);
        if (src == NULL)
            return EMB_E_CORRUPT;
        if (i + 1 < k) { /* start the next record's every page: the hardware
                            prefetcher stops at page boundaries */
            const uint8_t *next =
                locate(bases, starts, n_shards, record_bytes, rows[i + 1]);
            uint64_t off;
            if (next != NULL)
                for (off = 0; off < record_bytes; off += 4096)
                    __builtin_prefetch(next + off);
        }
        emb_copy(dst + i * record_bytes, src, record_bytes);
    }
    return EMB_OK;
}

/* CRC-32C: the SSE4.2 instruction where the CPU has it, else slicing-by-8. */
static uint32_t table[8][256];
static int table_ready;

static void make_table(void) {
    uint32_t i, j;
    for (i = 0; i < 256; i++) {
        uint32_t c = i;
        for (j = 0; j < 8; j++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][i] = c;
    }
    for (i = 0; i < 256; i++)
        for (j = 1; j < 8; j++)
            table[j][i] = (table[j - 1][i] >> 8) ^ table[0][table[j - 1][i] & 0xff];
    table_ready = 1;
}

static uint32_t crc_soft(uint32_t c, const uint8_t *p, size_t len) {
    if (!table_ready)
        make_table(); /* idempotent: a race writes the same values */
    while (len >= 8) {
        uint64_t v = emb_load_u64(p) ^ c;
        c = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^
            table[5][(v >> 16) & 0xff] ^ table[4][(v >> 24) & 0xff] ^
            table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
            table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8, len -= 8;
    }
    while (len--)
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
    return c;
}

#ifdef EMB_X86
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t c,
                                                         const uint8_t *p,
                                                         size_t len) {
    uint64_t c64 = c;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
        p += 8, len -= 8;
    }
    c = (uint32_t)c64;
    while (len--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

static int have_hw(void) {
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    return known;
}
#else
#define crc_hw crc_soft
static int have_hw(void) { return 0; }
#endif

uint32_t emb_crc32c(uint32_t crc, const uint8_t *p, size_t len) {
    uint32_t c = ~crc;
    c = have_hw() ? crc_hw(c, p, len) : crc_soft(c, p, len);
    return ~c;
}

void emb_crc32c_blocks(const uint8_t *p, uint64_t len, uint64_t block,
                       uint32_t *out) {
    uint64_t i, nblocks = block ? (len + block - 1) / block : 0;
    for (i = 0; i < nblocks; i++) {
        uint64_t n = len - i * block < block ? len - i * block : block;
        out[i] = emb_crc32c(0, p + i * block, (size_t)n);
    }
}
