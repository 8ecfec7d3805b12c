/*
 * search.c -- dot products of stored rows with a few query vectors, at the
 * speed memory delivers the rows (embfile.h: emb_dot), Hamming distances of
 * packed bits (emb_hamming), and the running top-k of every query
 * (emb_topk_merge).
 *
 * One pass over the rows: each row is loaded once and multiplied with every
 * query while it sits in L1.  float16, bfloat16 and (u)int8 rows are widened
 * in registers, so they cost a half or a quarter of the memory traffic of
 * float32 ones.  The AVX2 + FMA versions (AVX-512 for float16) are chosen at
 * run time; the portable loops give the same results up to rounding.  Rows are
 * split between threads.
 *
 * Scores are laid out query by query, so each query's top-k reads its scores
 * in memory order and rejects most of them eight at a time.
 */
#include <stdlib.h>
#include <string.h>

#include "embfile.h"
#include "internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EMB_X86 1
#endif

/* The first pass over a row asks for the line `ahead` bytes on.  Rows back to
 * back (stride == row_bytes) take that distance as it is; rows with a gap
 * between them (a leading part of each stored record) ask for the same place
 * as many rows on as that distance holds of their bytes, not for the gap. */
static inline uint64_t ahead_of(uint64_t row_bytes, uint64_t stride, uint64_t ahead) {
    return stride == row_bytes ? ahead : stride * ((ahead + row_bytes - 1) / row_bytes);
}

typedef void (*dot_fn)(const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride,
                       const float *q, uint32_t nq, float *out, uint64_t ld);

#define EMB_DOT_PORTABLE(NAME, WIDTH, SCALAR)                                    \
    static void NAME(const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride, \
                     const float *q, uint32_t nq, float *out, uint64_t ld) {     \
        for (uint64_t r = 0; r < n; r++) {                                       \
            const uint8_t *row = x + r * stride;                                 \
            for (uint32_t j = 0; j < nq; j++) {                                  \
                float s = 0;                                                     \
                for (uint32_t d = 0; d < dim; d++) s += SCALAR(row, d) * q[(uint64_t)j * dim + d]; \
                out[j * ld + r] = s;                                             \
            }                                                                    \
        }                                                                        \
    }
EMB_DOT_PORTABLE(dot_f32, 4u, emb_value_f32)
EMB_DOT_PORTABLE(dot_f16, 2u, emb_value_f16)
EMB_DOT_PORTABLE(dot_bf16, 2u, emb_value_bf16)
EMB_DOT_PORTABLE(dot_i8, 1u, emb_value_i8)
EMB_DOT_PORTABLE(dot_u8, 1u, emb_value_u8)

#ifdef EMB_X86
__attribute__((target("avx2,fma"))) static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* `load(row, d)` gives 8 floats of the row from element d; the rest of the
 * row (dim % 8 elements) is added one by one.  Queries go four at a time, each
 * load of the row feeding four independent sums (two per query, so eight FMA
 * chains hide their latency); the last nq % 4 one by one.  The first pass over
 * a row asks for the cache line AHEAD bytes on, once per line: the hardware's
 * own prefetch stops at each 4 KiB page of a file's mapping.  The distance is
 * in bytes, what the memory's latency asks for whatever the type (counted in
 * values, int8 rows would ask a quarter as far ahead, and run a third slower). */
enum { AHEAD = 2048 };
#define EMB_FMA4(V, D, A, B, C, E)                                               \
    A = _mm256_fmadd_ps(V, _mm256_loadu_ps(q0 + (D)), A);                       \
    B = _mm256_fmadd_ps(V, _mm256_loadu_ps(q1 + (D)), B);                       \
    C = _mm256_fmadd_ps(V, _mm256_loadu_ps(q2 + (D)), C);                       \
    E = _mm256_fmadd_ps(V, _mm256_loadu_ps(q3 + (D)), E);
#define EMB_DOT_AVX2(NAME, WIDTH, LOAD, SCALAR)                                   \
    __attribute__((target("avx2,fma,f16c"))) static void NAME(                 \
        const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride, const float *q, \
        uint32_t nq, float *out, uint64_t ld) {                                  \
        uint32_t body = dim & ~7u;                                               \
        const uint64_t ahead = ahead_of((uint64_t)dim * (WIDTH), stride, AHEAD); \
        for (uint64_t r = 0; r < n; r++) {                                       \
            const uint8_t *row = x + r * stride;                                 \
            uint32_t j = 0;                                                      \
            for (; j + 4 <= nq; j += 4) {                                        \
                const float *q0 = q + (uint64_t)j * dim, *q1 = q0 + dim;         \
                const float *q2 = q1 + dim, *q3 = q2 + dim;                      \
                __m256 a0 = _mm256_setzero_ps(), b0 = a0, c0 = a0, e0 = a0;     \
                __m256 a1 = a0, b1 = a0, c1 = a0, e1 = a0;                       \
                uint32_t d = 0;                                                  \
                for (; d + 16 <= body; d += 16) {                                \
                    if (!j && !(((WIDTH) * d) & 63)) _mm_prefetch((const char *)(row + (WIDTH) * d + ahead), _MM_HINT_T0); \
                    __m256 v0 = LOAD(row, d), v1 = LOAD(row, d + 8);             \
                    EMB_FMA4(v0, d, a0, b0, c0, e0)                              \
                    EMB_FMA4(v1, d + 8, a1, b1, c1, e1)                          \
                }                                                                \
                for (; d < body; d += 8) {                                       \
                    __m256 v0 = LOAD(row, d);                                    \
                    EMB_FMA4(v0, d, a0, b0, c0, e0)                              \
                }                                                                \
                float s0 = hsum(_mm256_add_ps(a0, a1)), s1 = hsum(_mm256_add_ps(b0, b1)); \
                float s2 = hsum(_mm256_add_ps(c0, c1)), s3 = hsum(_mm256_add_ps(e0, e1)); \
                for (; d < dim; d++) {                                           \
                    float v = SCALAR(row, d);                                    \
                    s0 += v * q0[d], s1 += v * q1[d], s2 += v * q2[d], s3 += v * q3[d]; \
                }                                                                \
                out[j * ld + r] = s0, out[(j + 1) * ld + r] = s1;                \
                out[(j + 2) * ld + r] = s2, out[(j + 3) * ld + r] = s3;          \
            }                                                                    \
            for (; j < nq; j++) {                                                \
                const float *qj = q + (uint64_t)j * dim;                         \
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();       \
                uint32_t d = 0;                                                  \
                for (; d + 16 <= body; d += 16) {                                \
                    if (!j && !(((WIDTH) * d) & 63)) _mm_prefetch((const char *)(row + (WIDTH) * d + ahead), _MM_HINT_T0); \
                    a0 = _mm256_fmadd_ps(LOAD(row, d), _mm256_loadu_ps(qj + d), a0); \
                    a1 = _mm256_fmadd_ps(LOAD(row, d + 8), _mm256_loadu_ps(qj + d + 8), a1); \
                }                                                                \
                for (; d < body; d += 8)                                         \
                    a0 = _mm256_fmadd_ps(LOAD(row, d), _mm256_loadu_ps(qj + d), a0); \
                float s = hsum(_mm256_add_ps(a0, a1));                           \
                for (; d < dim; d++) s += SCALAR(row, d) * qj[d];                \
                out[j * ld + r] = s;                                             \
            }                                                                    \
        }                                                                        \
    }

#define LOAD_F32(row, d) _mm256_loadu_ps((const float *)(const void *)(row) + (d))
#define LOAD_F16(row, d) \
    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)((row) + 2u * (d))))
#define LOAD_BF16(row, d) /* the upper halves of float32s */                   \
    _mm256_castsi256_ps(_mm256_slli_epi32(                                       \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)((row) + 2u * (d)))), 16))
#define LOAD_I8(row, d) \
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)((row) + (d)))))
#define LOAD_U8(row, d) \
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)((row) + (d)))))

EMB_DOT_AVX2(dot_f32_avx2, 4u, LOAD_F32, emb_value_f32)
EMB_DOT_AVX2(dot_f16_avx2, 2u, LOAD_F16, emb_value_f16)
EMB_DOT_AVX2(dot_bf16_avx2, 2u, LOAD_BF16, emb_value_bf16)
EMB_DOT_AVX2(dot_i8_avx2, 1u, LOAD_I8, emb_value_i8)
EMB_DOT_AVX2(dot_u8_avx2, 1u, LOAD_U8, emb_value_u8)

/* float16 rows with AVX-512: sixteen values widened per instruction, half the
 * instructions of AVX2 per byte; queries four at a time as there, the rest of
 * the row (dim % 16) as in AVX2. */
#define LOAD16_F16(row, d) \
    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)((row) + 2u * (d))))
__attribute__((target("avx512f,avx2,fma,f16c"))) static void dot_f16_avx512(
    const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride, const float *q, uint32_t nq, float *out,
    uint64_t ld) {
    uint32_t body = dim & ~15u;
    const uint64_t ahead = ahead_of((uint64_t)dim * 2u, stride, AHEAD);
    for (uint64_t r = 0; r < n; r++) {
        const uint8_t *row = x + r * stride;
        uint32_t j = 0;
        for (; j + 4 <= nq; j += 4) {
            const float *q0 = q + (uint64_t)j * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
            __m512 a = _mm512_setzero_ps(), b = a, c = a, e = a;
            uint32_t d = 0;
            for (; d < body; d += 16) {
                if (!j && !(d & 31)) _mm_prefetch((const char *)(row + 2u * d + ahead), _MM_HINT_T0);
                __m512 v = LOAD16_F16(row, d);
                a = _mm512_fmadd_ps(v, _mm512_loadu_ps(q0 + d), a);
                b = _mm512_fmadd_ps(v, _mm512_loadu_ps(q1 + d), b);
                c = _mm512_fmadd_ps(v, _mm512_loadu_ps(q2 + d), c);
                e = _mm512_fmadd_ps(v, _mm512_loadu_ps(q3 + d), e);
            }
            float s0 = _mm512_reduce_add_ps(a), s1 = _mm512_reduce_add_ps(b);
            float s2 = _mm512_reduce_add_ps(c), s3 = _mm512_reduce_add_ps(e);
            for (; d < dim; d++) {
                float v = emb_value_f16(row, d);
                s0 += v * q0[d], s1 += v * q1[d], s2 += v * q2[d], s3 += v * q3[d];
            }
            out[j * ld + r] = s0, out[(j + 1) * ld + r] = s1;
            out[(j + 2) * ld + r] = s2, out[(j + 3) * ld + r] = s3;
        }
        for (; j < nq; j++) {
            const float *qj = q + (uint64_t)j * dim;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            uint32_t d = 0;
            for (; d + 32 <= body; d += 32) {
                if (!j) _mm_prefetch((const char *)(row + 2u * d + ahead), _MM_HINT_T0);
                a0 = _mm512_fmadd_ps(LOAD16_F16(row, d), _mm512_loadu_ps(qj + d), a0);
                a1 = _mm512_fmadd_ps(LOAD16_F16(row, d + 16), _mm512_loadu_ps(qj + d + 16), a1);
            }
            for (; d < body; d += 16) a0 = _mm512_fmadd_ps(LOAD16_F16(row, d), _mm512_loadu_ps(qj + d), a0);
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for (; d < dim; d++) s += emb_value_f16(row, d) * qj[d];
            out[j * ld + r] = s;
        }
    }
}
#endif

static dot_fn choose(int kind) {
    static const dot_fn portable[] = {dot_f32, dot_f16, dot_bf16, dot_i8, dot_u8};
#ifdef EMB_X86
    static const dot_fn avx2[] = {dot_f32_avx2, dot_f16_avx2, dot_bf16_avx2, dot_i8_avx2, dot_u8_avx2};
    if (getenv("EMBFILE_PORTABLE")) /* tests: the loops other CPUs run */
        return portable[kind];
    int avx512 = !getenv("EMBFILE_AVX2"); /* tests: the AVX2 loops of CPUs without AVX-512 */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
        if (kind == EMB_DOT_F16 && avx512 && __builtin_cpu_supports("avx512f")) return dot_f16_avx512;
        return avx2[kind];
    }
#endif
    return portable[kind];
}

typedef struct {
    dot_fn fn;
    const uint8_t *x;
    uint64_t n, stride;
    uint32_t dim, nq;
    const float *q;
    float *out;
    uint64_t ld;
} dot_job;

static void *run_job(void *arg) {
    dot_job *j = arg;
    j->fn(j->x, j->n, j->dim, j->stride, j->q, j->nq, j->out, j->ld);
    return NULL;
}

int emb_dot(const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride, int kind,
            const float *q, uint32_t nq, float *out, uint64_t ld, int threads) {
    dot_job jobs[EMB_MAX_THREADS];
    static const uint64_t widths[] = {4u, 2u, 2u, 1u, 1u};
    if (kind < EMB_DOT_F32 || kind > EMB_DOT_U8 || stride < dim * widths[kind]) return EMB_E_RANGE;
    threads = emb_jobs(threads, n);
    dot_fn fn = choose(kind);
    uint64_t lo = 0;
    for (int t = 0; t < threads; t++) {
        uint64_t count = emb_share(n, threads, t);
        jobs[t] = (dot_job){fn, x + lo * stride, count, stride, dim, nq, q, out + lo, ld};
        lo += count;
    }
    emb_run_jobs(run_job, jobs, sizeof jobs[0], threads);
    return EMB_OK;
}

/* Hamming distances: the bits that differ between rows of packed bits and a
 * few queries.  As in the dot products, each row is loaded once for all the
 * queries, and lines ahead are asked for once each. */
typedef void (*hamming_fn)(const uint8_t *x, uint64_t n, uint32_t nbytes, uint64_t stride, const uint8_t *q,
                           uint32_t nq, float *out, uint64_t ld);
enum { HAMMING_AHEAD = 2048 };

/* The bits that differ in bytes [d, nbytes) of a row and a query: eight bytes
 * a popcount (one instruction where the caller is compiled for the CPU's
 * popcnt), the last ones byte by byte. */
static inline uint64_t differing_bits(const uint8_t *row, const uint8_t *qj, uint32_t d, uint32_t nbytes) {
    uint64_t bits = 0;
    for (; d + 8 <= nbytes; d += 8) {
        uint64_t a, b;
        memcpy(&a, row + d, 8);
        memcpy(&b, qj + d, 8);
        bits += (uint64_t)__builtin_popcountll(a ^ b);
    }
    for (; d < nbytes; d++) bits += (uint64_t)__builtin_popcount((unsigned)(row[d] ^ qj[d]));
    return bits;
}

/* A Hamming kernel: rows `stride` bytes apart, the lines ahead of each asked
 * for once, then COUNT(row, query, nbytes), the bits that differ, for every
 * query while the row sits in L1. */
#define EMB_HAMMING(NAME, ATTRIBUTES, COUNT)                                                       \
    ATTRIBUTES static void NAME(const uint8_t *x, uint64_t n, uint32_t nbytes, uint64_t stride,    \
                                const uint8_t *q, uint32_t nq, float *out, uint64_t ld) {          \
        const uint64_t ahead = ahead_of(nbytes, stride, HAMMING_AHEAD);                            \
        for (uint64_t r = 0; r < n; r++) {                                                         \
            const uint8_t *row = x + r * stride;                                                   \
            for (uint32_t o = 0; o < nbytes; o += 64) __builtin_prefetch(row + ahead + o);         \
            for (uint32_t j = 0; j < nq; j++) out[j * ld + r] = (float)COUNT(row, q + (uint64_t)j * nbytes, nbytes); \
        }                                                                                          \
    }

static inline uint64_t bits_portable(const uint8_t *row, const uint8_t *qj, uint32_t nbytes) {
    return differing_bits(row, qj, 0, nbytes);
}
EMB_HAMMING(hamming_portable, , bits_portable)

#ifdef EMB_X86
/* AVX2, which has no vector popcount: 32 bytes at a time, the bits of each
 * half byte looked up with a byte shuffle and the bytes summed by vpsadbw
 * (Mula, Kurz and Lemire's count, as faiss's binary indexes use it); the rest
 * of the row eight bytes a popcnt. */
__attribute__((target("avx2,popcnt"))) static inline uint64_t bits_avx2(const uint8_t *row, const uint8_t *qj,
                                                                        uint32_t nbytes) {
    const __m256i half_byte_bits = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                                    0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    uint32_t body = nbytes & ~31u;
    __m256i acc = zero;
    for (uint32_t d = 0; d < body; d += 32) {
        __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(const void *)(row + d)),
                                     _mm256_loadu_si256((const __m256i *)(const void *)(qj + d)));
        __m256i lo = _mm256_shuffle_epi8(half_byte_bits, _mm256_and_si256(v, low));
        __m256i hi = _mm256_shuffle_epi8(half_byte_bits, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_add_epi8(lo, hi), zero));
    }
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    return (uint64_t)_mm_cvtsi128_si64(s) + (uint64_t)_mm_extract_epi64(s, 1) + differing_bits(row, qj, body, nbytes);
}
EMB_HAMMING(hamming_avx2, __attribute__((target("avx2,popcnt"))), bits_avx2)

/* AVX-512 VPOPCNTDQ: 64 bytes a popcount instruction, the row's last bytes
 * read through a mask (nothing past the row is touched). */
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq"))) static inline uint64_t bits_avx512(
    const uint8_t *row, const uint8_t *qj, uint32_t nbytes) {
    uint32_t body = nbytes & ~63u, rest = nbytes - body;
    __m512i acc = _mm512_setzero_si512();
    for (uint32_t d = 0; d < body; d += 64) {
        __m512i v = _mm512_xor_si512(_mm512_loadu_si512(row + d), _mm512_loadu_si512(qj + d));
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(v));
    }
    if (rest) {
        __mmask64 tail = ~0ULL >> (64u - rest);
        __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, row + body), _mm512_maskz_loadu_epi8(tail, qj + body));
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(v));
    }
    return (uint64_t)_mm512_reduce_add_epi64(acc);
}
EMB_HAMMING(hamming_avx512, __attribute__((target("avx512f,avx512bw,avx512vpopcntdq"))), bits_avx512)
#endif

typedef struct {
    hamming_fn fn;
    const uint8_t *x;
    uint64_t n, stride;
    uint32_t nbytes, nq;
    const uint8_t *q;
    float *out;
    uint64_t ld;
} hamming_job;

static void *run_hamming(void *arg) {
    hamming_job *j = arg;
    j->fn(j->x, j->n, j->nbytes, j->stride, j->q, j->nq, j->out, j->ld);
    return NULL;
}

void emb_hamming(const uint8_t *x, uint64_t n, uint32_t nbytes, uint64_t stride, const uint8_t *q, uint32_t nq,
                 float *out, uint64_t ld, int threads) {
    hamming_fn fn = hamming_portable;
#ifdef EMB_X86
    __builtin_cpu_init();
    if (!getenv("EMBFILE_PORTABLE") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) {
        fn = hamming_avx2;
        if (!getenv("EMBFILE_AVX2") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vpopcntdq"))
            fn = hamming_avx512;
    }
#endif
    hamming_job jobs[EMB_MAX_THREADS];
    threads = emb_jobs(threads, n);
    uint64_t lo = 0;
    for (int t = 0; t < threads; t++) {
        uint64_t count = emb_share(n, threads, t);
        jobs[t] = (hamming_job){fn, x + lo * stride, count, stride, nbytes, nq, q, out + lo, ld};
        lo += count;
    }
    emb_run_jobs(run_hamming, jobs, sizeof jobs[0], threads);
}

/* Top-k: is candidate (s, r) worse than (t, q)?  Larger scores are better
 * (the caller negates for "smaller is better"); NaN is worse than any number;
 * between equals, the later row is worse. */
static int worse(float s, int64_t r, float t, int64_t q) {
    int sn = s != s, tn = t != t;
    if (sn != tn) return sn;
    if (!sn && s != t) return s < t;
    return r > q;
}

/* Sift the heap (worst at the root) of n entries down from i. */
static void sift(float *hs, int64_t *hr, uint32_t n, uint32_t i) {
    for (;;) {
        uint32_t w = i, a = 2 * i + 1, b = a + 1;
        if (a < n && worse(hs[a], hr[a], hs[w], hr[w])) w = a;
        if (b < n && worse(hs[b], hr[b], hs[w], hr[w])) w = b;
        if (w == i) return;
        float ts = hs[i];
        int64_t tr = hr[i];
        hs[i] = hs[w], hr[i] = hr[w], hs[w] = ts, hr[w] = tr;
        i = w;
    }
}

typedef struct {
    const float *scores;
    uint64_t ld, n;
    uint32_t first, last, k;
    const int64_t *rows;
    int smaller;
    float *heap_scores;
    int64_t *heap_rows;
    uint32_t *count;
} topk_job;

/* The score a candidate must beat to enter heap j: the worst kept, or NaN
 * while the heap is not full or keeps a NaN.  `!(s <= bar)` then rejects
 * most candidates with one comparison and lets through every one that needs
 * the full test (NaN on either side compares false). */
static float bar_of(const float *hs, uint32_t c, uint32_t k) {
    return c == k && k && hs[0] == hs[0] ? hs[0] : __builtin_nanf("");
}

/* Offer (s, r) to heap j, whose bar it passed; returns the heap's new bar. */
static float admit(const topk_job *t, uint32_t j, float s, int64_t r) {
    uint32_t k = t->k, c = t->count[j];
    float *hs = t->heap_scores + (uint64_t)j * k;
    int64_t *hr = t->heap_rows + (uint64_t)j * k;
    if (c < k) { /* not full: add, and restore the heap upwards */
        uint32_t i = c++;
        hs[i] = s, hr[i] = r;
        while (i && worse(hs[i], hr[i], hs[(i - 1) / 2], hr[(i - 1) / 2])) {
            uint32_t p = (i - 1) / 2;
            float ts = hs[i];
            int64_t tr = hr[i];
            hs[i] = hs[p], hr[i] = hr[p], hs[p] = ts, hr[p] = tr;
            i = p;
        }
        t->count[j] = c;
    } else if (k && worse(hs[0], hr[0], s, r)) { /* better than the worst kept */
        hs[0] = s, hr[0] = r;
        sift(hs, hr, c, 0);
    }
    return bar_of(hs, c, k);
}

/* Query j's scores of rows [from, n), in memory order. */
typedef void (*offer_fn)(const topk_job *t, uint32_t j, const float *scores, uint64_t from, float sign);

static void offer(const topk_job *t, uint32_t j, const float *scores, uint64_t from, float sign) {
    float bar = bar_of(t->heap_scores + (uint64_t)j * t->k, t->count[j], t->k);
    for (uint64_t r = from; r < t->n; r++) {
        float s = sign * scores[r];
        if (!(s <= bar)) bar = admit(t, j, s, t->rows[r]);
    }
}

#ifdef EMB_X86
/* Eight rows at a time: one comparison finds which of them enter the heap, most often none. */
__attribute__((target("avx2"))) static void offer_avx2(const topk_job *t, uint32_t j, const float *scores,
                                                       uint64_t from, float sign) {
    __m256 signs = _mm256_set1_ps(sign);
    __m256 bar = _mm256_set1_ps(bar_of(t->heap_scores + (uint64_t)j * t->k, t->count[j], t->k));
    uint64_t r = from;
    for (; r + 8 <= t->n; r += 8) {
        __m256 s = _mm256_mul_ps(_mm256_loadu_ps(scores + r), signs);
        unsigned pass = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(s, bar, _CMP_NLE_UQ));
        if (!pass) continue;
        float b = _mm256_cvtss_f32(bar);
        for (; pass; pass &= pass - 1) { /* in row order: ties go to the earlier row */
            uint64_t i = r + (uint64_t)__builtin_ctz(pass);
            float si = sign * scores[i];
            if (!(si <= b)) b = admit(t, j, si, t->rows[i]);
        }
        bar = _mm256_set1_ps(b);
    }
    offer(t, j, scores, r, sign);
}
#endif

static void *run_topk(void *arg) {
    topk_job *t = arg;
    float sign = t->smaller ? -1.0f : 1.0f;
    offer_fn fn = offer;
#ifdef EMB_X86
    __builtin_cpu_init();
    if (!getenv("EMBFILE_PORTABLE") && __builtin_cpu_supports("avx2")) fn = offer_avx2;
#endif
    for (uint32_t j = t->first; j < t->last; j++) fn(t, j, t->scores + j * t->ld, 0, sign);
    return NULL;
}

void emb_topk_merge(const float *scores, uint64_t ld, uint64_t n, uint32_t nq,
                    const int64_t *rows, uint32_t k, int smaller,
                    float *heap_scores, int64_t *heap_rows, uint32_t *count, int threads) {
    topk_job jobs[EMB_MAX_THREADS];
    threads = emb_jobs(threads, nq);
    uint32_t lo = 0;
    for (int t = 0; t < threads; t++) { /* the queries, split: each heap is one thread's */
        uint32_t share = (uint32_t)emb_share(nq, threads, t);
        jobs[t] = (topk_job){scores, ld, n, lo, lo + share, k, rows, smaller, heap_scores, heap_rows, count};
        lo += share;
    }
    emb_run_jobs(run_topk, jobs, sizeof jobs[0], threads);
}

/* float16 -> float32, n values (the BLAS path of a search of many queries). */
static void widen_portable(const uint8_t *src, uint64_t n, float *dst) {
    for (uint64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2u * i, 2);
        dst[i] = emb_half_to_float(h);
    }
}

#ifdef EMB_X86
__attribute__((target("avx2,f16c"))) static void widen_f16c(const uint8_t *src, uint64_t n, float *dst) {
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(src + 2u * i))));
    widen_portable(src + 2u * i, n - i, dst + i);
}
#endif

typedef struct {
    const uint8_t *src;
    uint64_t n;
    float *dst;
    void (*fn)(const uint8_t *, uint64_t, float *);
} widen_job;

static void *run_widen(void *arg) {
    widen_job *j = arg;
    j->fn(j->src, j->n, j->dst);
    return NULL;
}

void emb_widen_f16(const uint8_t *src, uint64_t n, float *dst, int threads) {
    void (*fn)(const uint8_t *, uint64_t, float *) = widen_portable;
#ifdef EMB_X86
    __builtin_cpu_init();
    if (!getenv("EMBFILE_PORTABLE") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        fn = widen_f16c;
#endif
    widen_job jobs[EMB_MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > EMB_MAX_THREADS) threads = EMB_MAX_THREADS;
    uint64_t per = (n / (uint64_t)threads + 7) & ~(uint64_t)7, lo = 0;
    int t = 0;
    for (; t < threads && lo < n; t++) {
        uint64_t count = n - lo < per ? n - lo : per;
        jobs[t] = (widen_job){src + 2u * lo, count, dst + lo, fn};
        lo += count;
    }
    emb_run_jobs(run_widen, jobs, sizeof jobs[0], t);
}
