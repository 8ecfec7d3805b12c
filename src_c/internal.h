/* internal.h -- little-endian loads and stores and small helpers shared by the core. */
#ifndef EMBFILE_INTERNAL_H
#define EMBFILE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define EMB_BSWAP64(x) __builtin_bswap64(x)
#define EMB_BSWAP32(x) __builtin_bswap32(x)
#define EMB_BE64(x) (x)
#else
#define EMB_BSWAP64(x) (x)
#define EMB_BSWAP32(x) (x)
#define EMB_BE64(x) __builtin_bswap64(x)
#endif

static inline uint64_t emb_load_u64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return EMB_BSWAP64(v);
}

static inline uint32_t emb_load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return EMB_BSWAP32(v);
}

static inline void emb_store_u64(uint8_t *p, uint64_t v) {
    v = EMB_BSWAP64(v);
    memcpy(p, &v, 8);
}

static inline void emb_store_u32(uint8_t *p, uint32_t v) {
    v = EMB_BSWAP32(v);
    memcpy(p, &v, 4);
}

static inline uint64_t emb_align(uint64_t x, uint64_t a) {
    return (x + a - 1) & ~(a - 1);
}

/* The first 8 bytes of p[0..len) read big-endian and zero padded, so that
 * comparing prefixes as integers orders keys bytewise (FORMAT.md "Index"). */
static inline uint64_t emb_prefix(const uint8_t *p, size_t len) {
    uint64_t v = 0;
    memcpy(&v, p, len < 8 ? len : 8);
    return EMB_BE64(v);
}

/* Bytewise order with a proper prefix first, like memcmp on equal lengths. */
static inline int emb_key_cmp(const uint8_t *a, size_t la, const uint8_t *b,
                              size_t lb) {
    int c = memcmp(a, b, la < lb ? la : lb);
    if (c != 0)
        return c;
    return (la > lb) - (la < lb);
}

/* IEEE half precision to float, exactly (subnormals, infinities and NaN too). */
static inline float emb_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu,
             man = h & 0x3ffu, bits;
    if (exp == 0x1f) { /* inf, NaN */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) { /* normal */
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        exp = 113u;
        while (!(man & 0x400u)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The element types the kernels read (embfile.h: EMB_DOT_*), one value at a
 * time: the loops other CPUs run, and the tails of the vectorised ones. */
static inline float emb_value_f32(const uint8_t *row, uint32_t d) {
    float v;
    memcpy(&v, row + 4u * d, 4);
    return v;
}
static inline float emb_value_f16(const uint8_t *row, uint32_t d) {
    uint16_t h;
    memcpy(&h, row + 2u * d, 2);
    return emb_half_to_float(h);
}
static inline float emb_value_bf16(const uint8_t *row, uint32_t d) {
    uint16_t h;
    memcpy(&h, row + 2u * d, 2);
    uint32_t bits = (uint32_t)h << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}
static inline float emb_value_i8(const uint8_t *row, uint32_t d) { return (float)(int8_t)row[d]; }
static inline float emb_value_u8(const uint8_t *row, uint32_t d) { return (float)row[d]; }

/* Runs fn on each of the n jobs at jobs (each `size` bytes): jobs 1 to n - 1
 * on threads of their own, job 0 on the caller's, which also runs any job
 * whose thread could not be started.  At most EMB_MAX_THREADS jobs. */
enum { EMB_MAX_THREADS = 64 };
static inline void emb_run_jobs(void *(*fn)(void *), void *jobs, size_t size, int n) {
    pthread_t ids[EMB_MAX_THREADS];
    int started = 0;
    for (int t = 1; t < n; t++) {
        if (pthread_create(&ids[t], NULL, fn, (char *)jobs + (size_t)t * size) != 0) break;
        started = t;
    }
    if (n > 0) fn(jobs);
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    for (int t = started + 1; t < n; t++) fn((char *)jobs + (size_t)t * size);
}

/* The jobs `items` things are split into: `threads`, at least one, at most
 * EMB_MAX_THREADS, and no more than there are items. */
static inline int emb_jobs(int threads, uint64_t items) {
    if (threads < 1) threads = 1;
    if (threads > EMB_MAX_THREADS) threads = EMB_MAX_THREADS;
    if ((uint64_t)threads > items) threads = items ? (int)items : 1;
    return threads;
}

/* How many of `items` things job t of `jobs` takes: an even share, the first
 * items % jobs jobs one more. */
static inline uint64_t emb_share(uint64_t items, int jobs, int t) {
    return items / (uint64_t)jobs + ((uint64_t)t < items % (uint64_t)jobs);
}

#endif
