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

/* The part holding global record `item` (below starts[n_parts]). */
static inline size_t part_of(const uint64_t *starts, size_t n_parts,
                             uint64_t item) {
    size_t lo = 0, hi = n_parts;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (starts[mid] <= item)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* The address of global row `row`, or NULL past the last shard. */
static inline const uint8_t *locate(const uint8_t *const *bases,
                                    const uint64_t *starts, size_t n_shards,
                                    uint64_t record_bytes, uint64_t row) {
    size_t s;
    if (row >= starts[n_shards])
        return NULL;
    s = part_of(starts, n_shards, row);
    return bases[s] + (row - starts[s]) * record_bytes;
}

int emb_gather(const uint8_t *const *bases, const uint64_t *starts,
               size_t n_shards, uint64_t record_bytes, const uint64_t *rows,
               size_t k, uint8_t *dst) {
    size_t i;
    for (i = 0; i < k; i++) {
        const uint8_t *src =
            locate(bases, starts, n_shards, record_bytes, rows[i]);
        if (src == NULL)
            return EMB_E_RANGE;
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

int emb_extents(const uint8_t *const *ranges, const uint64_t *starts,
                const uint64_t *part_rows, size_t n_parts,
                const uint64_t *items, size_t k, uint64_t *first,
                uint64_t *length) {
    size_t i;
    for (i = 0; i < k; i++) {
        size_t s;
        uint64_t local, a, b;
        if (items[i] >= starts[n_parts])
            return EMB_E_RANGE;
        s = part_of(starts, n_parts, items[i]);
        local = items[i] - starts[s];
        a = emb_load_u64(ranges[s] + 8 * local);
        b = emb_load_u64(ranges[s] + 8 * (local + 1));
        if (a >= b || b > part_rows[s])
            return EMB_E_CORRUPT;
        first[i] = a;
        length[i] = b - a;
    }
    return EMB_OK;
}

void emb_gather_ragged(const uint8_t *const *bases, const uint64_t *starts,
                       size_t n_parts, uint64_t record_bytes,
                       const uint64_t *items, const uint64_t *first,
                       const uint64_t *length, size_t k, uint64_t stride,
                       int zero_pad, uint8_t *dst) {
    size_t i;
    uint64_t at = 0;
    for (i = 0; i < k; i++) {
        size_t s = part_of(starts, n_parts, items[i]);
        if (stride)
            at = (uint64_t)i * stride;
        emb_copy(dst + at * record_bytes, bases[s] + first[i] * record_bytes,
                 length[i] * record_bytes);
        at += length[i];
        if (stride && zero_pad)
            memset(dst + at * record_bytes, 0, (stride - length[i]) * record_bytes);
    }
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
/* The crc32 instruction has a latency of 3 cycles and a throughput of 1, so three
   independent streams over three adjacent stretches run about 3x faster than one.
   Their CRCs are joined by "shifting" a CRC over a stretch of zeros, which is
   linear in the CRC: 4 lookups in a table built from the 32 shifted unit bits. */
#define STRETCH 4096 /* bytes per stream per round; a multiple of 8 */
static uint32_t shift_table[4][256];
static int shift_ready;

__attribute__((target("sse4.2"))) static void make_shift_table(void) {
    uint32_t unit[32], i, b, k;
    for (i = 0; i < 32; i++) {
        uint64_t c = 1u << i;
        for (k = 0; k < STRETCH / 8; k++)
            c = __builtin_ia32_crc32di(c, 0);
        unit[i] = (uint32_t)c;
    }
    for (k = 0; k < 4; k++)
        for (b = 0; b < 256; b++) {
            uint32_t c = 0;
            for (i = 0; i < 8; i++)
                if (b >> i & 1)
                    c ^= unit[8 * k + i];
            shift_table[k][b] = c;
        }
    __atomic_store_n(&shift_ready, 1, __ATOMIC_RELEASE); /* after the table, for other threads */
}

/* The CRC register after ``c`` is followed by STRETCH zero bytes. */
static uint32_t shift_over_stretch(uint32_t c) {
    return shift_table[0][c & 0xff] ^ shift_table[1][(c >> 8) & 0xff] ^
           shift_table[2][(c >> 16) & 0xff] ^ shift_table[3][c >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t c,
                                                         const uint8_t *p,
                                                         size_t len) {
    uint64_t c0 = c;
    if (len >= 3 * STRETCH && !__atomic_load_n(&shift_ready, __ATOMIC_ACQUIRE))
        make_shift_table(); /* idempotent: a race writes the same values */
    while (len >= 3 * STRETCH) {
        uint64_t c1 = 0, c2 = 0, v0, v1, v2;
        const uint8_t *end = p + STRETCH;
        do {
            memcpy(&v0, p, 8);
            memcpy(&v1, p + STRETCH, 8);
            memcpy(&v2, p + 2 * STRETCH, 8);
            c0 = __builtin_ia32_crc32di(c0, v0);
            c1 = __builtin_ia32_crc32di(c1, v1);
            c2 = __builtin_ia32_crc32di(c2, v2);
            p += 8;
        } while (p < end);
        c0 = shift_over_stretch((uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift_over_stretch((uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * STRETCH, len -= 3 * STRETCH;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c0 = __builtin_ia32_crc32di(c0, v);
        p += 8, len -= 8;
    }
    c = (uint32_t)c0;
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
