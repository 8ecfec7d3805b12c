/* shuffle.c -- the random order of an epoch: a seeded generator and Fisher-Yates.
 *
 * The generator is splitmix64 and the bounded draw is Lemire's unbiased
 * multiply-and-reject, so an epoch's order depends only on (seed, epoch) and
 * this file, never on numpy's or the platform's generators. */
#include "embfile.h"

static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A uniform integer in [0, range), range >= 1. */
static inline uint64_t below(uint64_t *state, uint64_t range) {
    __uint128_t m = (__uint128_t)splitmix64(state) * range;
    uint64_t low = (uint64_t)m;
    if (low < range) {
        uint64_t floor = -range % range;
        while (low < floor) {
            m = (__uint128_t)splitmix64(state) * range;
            low = (uint64_t)m;
        }
    }
    return (uint64_t)(m >> 64);
}

uint64_t emb_stream_seed(uint64_t seed, uint64_t epoch, uint64_t stream) {
    uint64_t s = seed;
    uint64_t a = splitmix64(&s) ^ epoch;
    uint64_t b = splitmix64(&a) ^ stream;
    return splitmix64(&b);
}

void emb_shuffle(uint64_t *items, uint64_t n, uint64_t seed) {
    uint64_t state = seed, i;
    for (i = n; i > 1; i--) {
        uint64_t j = below(&state, i), t = items[i - 1];
        items[i - 1] = items[j];
        items[j] = t;
    }
}
