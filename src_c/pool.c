/*
 * pool.c -- one vector per ragged record (per-residue embeddings): the mean or
 * the maximum of its rows (embfile.h: emb_pool), for Dataset.pool and the
 * search of a ragged dataset.
 *
 * Each row is widened into a float32 row that stays in L1 (F16C for float16
 * where the CPU has it), then added into float64 sums or taken into the
 * running maximum, so a pass runs at the speed memory delivers the rows
 * (numpy's reduceat over a float16 block is scalar, twenty times slower).
 * Records are split between threads by their rows.
 */
#include <stdlib.h>
#include <string.h>

#include "embfile.h"
#include "internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EMB_X86 1
#endif

typedef void (*widen_fn)(const uint8_t *row, uint32_t dim, float *dst);

#define EMB_WIDEN_ROW(NAME, VALUE)                                          \
    static void NAME(const uint8_t *row, uint32_t dim, float *dst) {       \
        for (uint32_t d = 0; d < dim; d++) dst[d] = VALUE(row, d);          \
    }
EMB_WIDEN_ROW(row_f32, emb_value_f32)
EMB_WIDEN_ROW(row_f16, emb_value_f16)
EMB_WIDEN_ROW(row_bf16, emb_value_bf16)
EMB_WIDEN_ROW(row_i8, emb_value_i8)
EMB_WIDEN_ROW(row_u8, emb_value_u8)

typedef struct {
    widen_fn widen;
    const uint8_t *x;
    uint64_t row_bytes;
    uint32_t dim;
    const int64_t *offsets;
    uint64_t lo, hi; /* records */
    int how;
    float *out;
    int status;
} pool_job;

/* Records [lo, hi): record r is rows offsets[r] to offsets[r + 1] (at least
 * one).  A maximum keeps NaN once met, as numpy's does. */
static inline __attribute__((always_inline)) void pool_records(pool_job *j, float *row, double *sum) {
    uint32_t dim = j->dim;
    for (uint64_t r = j->lo; r < j->hi; r++) {
        int64_t first = j->offsets[r], last = j->offsets[r + 1];
        float *o = j->out + r * dim;
        if (j->how == EMB_POOL_MEAN) {
            memset(sum, 0, dim * sizeof(double));
            for (int64_t i = first; i < last; i++) {
                j->widen(j->x + (uint64_t)i * j->row_bytes, dim, row);
                for (uint32_t d = 0; d < dim; d++) sum[d] += row[d];
            }
            double n = (double)(last - first);
            for (uint32_t d = 0; d < dim; d++) o[d] = (float)(sum[d] / n);
        } else {
            j->widen(j->x + (uint64_t)first * j->row_bytes, dim, o);
            for (int64_t i = first + 1; i < last; i++) {
                j->widen(j->x + (uint64_t)i * j->row_bytes, dim, row);
                for (uint32_t d = 0; d < dim; d++) o[d] = (row[d] > o[d] || row[d] != row[d]) ? row[d] : o[d];
            }
        }
    }
}

static void pool_portable(pool_job *j, float *row, double *sum) { pool_records(j, row, sum); }

#ifdef EMB_X86
__attribute__((target("avx2,f16c"))) static void pool_avx2(pool_job *j, float *row, double *sum) {
    pool_records(j, row, sum);
}

__attribute__((target("avx2,f16c"))) static void row_f16c(const uint8_t *row, uint32_t dim, float *dst) {
    uint32_t d = 0;
    for (; d + 8 <= dim; d += 8)
        _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + 2u * d))));
    for (; d < dim; d++) dst[d] = emb_value_f16(row, d);
}
#endif

static int vectorised(void) {
#ifdef EMB_X86
    __builtin_cpu_init();
    return !getenv("EMBFILE_PORTABLE") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static void *run_pool(void *arg) {
    pool_job *j = arg;
    float *row = malloc(j->dim * sizeof(float) + 64);
    double *sum = malloc(j->dim * sizeof(double) + 64);
    if (!row || !sum) {
        j->status = EMB_E_NOMEM;
    } else {
#ifdef EMB_X86
        if (vectorised())
            pool_avx2(j, row, sum);
        else
#endif
            pool_portable(j, row, sum);
    }
    free(row);
    free(sum);
    return NULL;
}

int emb_pool(const uint8_t *x, uint32_t dim, int kind, const int64_t *offsets, uint64_t n, int how,
             float *out, int threads) {
    static const uint64_t widths[] = {4u, 2u, 2u, 1u, 1u};
    static const widen_fn rows[] = {row_f32, row_f16, row_bf16, row_i8, row_u8};
    pool_job jobs[EMB_MAX_THREADS];
    if (kind < EMB_DOT_F32 || kind > EMB_DOT_U8 || (how != EMB_POOL_MEAN && how != EMB_POOL_MAX)) return EMB_E_RANGE;
    widen_fn widen = rows[kind];
#ifdef EMB_X86
    if (kind == EMB_DOT_F16 && vectorised()) widen = row_f16c;
#endif
    threads = emb_jobs(threads, n);
    /* thread t takes the records from the one holding row (total * t / threads) of the block */
    uint64_t lo = 0, total = n ? (uint64_t)(offsets[n] - offsets[0]) : 0;
    for (int t = 0; t < threads; t++) {
        uint64_t hi = n;
        if (t + 1 < threads) {
            int64_t cut = offsets[0] + (int64_t)(total / (uint64_t)threads * (uint64_t)(t + 1));
            uint64_t a = lo, b = n; /* the first record from lo starting at or past the cut */
            while (a < b) {
                uint64_t m = a + (b - a) / 2;
                if (offsets[m] < cut) a = m + 1; else b = m;
            }
            hi = a;
        }
        jobs[t] = (pool_job){widen, x, dim * widths[kind], dim, offsets, lo, hi, how, out, EMB_OK};
        lo = hi;
    }
    emb_run_jobs(run_pool, jobs, sizeof jobs[0], threads);
    for (int t = 0; t < threads; t++)
        if (jobs[t].status != EMB_OK) return jobs[t].status;
    return EMB_OK;
}
