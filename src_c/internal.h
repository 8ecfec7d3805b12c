/* internal.h -- little-endian loads and stores and small helpers shared by the core. */
#ifndef EMBFILE_INTERNAL_H
#define EMBFILE_INTERNAL_H

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

#endif
