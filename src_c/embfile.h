/*
 * embfile.h -- the C core of embfile.
 *
 * The core knows bytes only: it never sees a path, a file descriptor or a
 * Python object, so it can be fuzzed standalone.  Every function that reads a
 * section of a file gets that section's pointer and length and checks every
 * offset it reads against them before use.  Functions return EMB_OK (0),
 * EMB_NOT_FOUND (1) or a negative EMB_E_* status; the Python layer turns those
 * into exceptions.  Nothing here allocates except where stated.
 *
 * The on-disk layout these functions read and write is specified in FORMAT.md.
 */
#ifndef EMBFILE_H
#define EMBFILE_H

#include <stddef.h>
#include <stdint.h>

#define EMB_OK 0
#define EMB_NOT_FOUND 1
#define EMB_NEED 2 /* a probing lookup needs pages it does not have */
#define EMB_E_CORRUPT (-1)   /* a section's inner structure is inconsistent */
#define EMB_E_DUPLICATE (-2) /* two keys are equal (writer) */
#define EMB_E_NOMEM (-3)     /* malloc failed (writer, verify) */
#define EMB_E_LIMIT (-4)     /* a key is longer than EMB_MAX_KEY_BYTES (writer) */
#define EMB_E_RANGE (-5)     /* a row number is past the last record (gather) */

#define EMB_PAGE 4096u
#define EMB_MAX_KEY_BYTES 65535u /* FORMAT.md "Limits" */
#define EMB_FENCE_ENTRY 16u      /* u64 first prefix, u64 bucket offset */
#define EMB_FENCE_GROUP 32u      /* fence entries per top-level entry */

/* A view of a mapped index section (FORMAT.md "Index"); filled by emb_index_open. */
typedef struct {
    const uint8_t *lcp;   /* prefix shared by every key */
    uint64_t lcp_len;
    const uint8_t *top;   /* first prefix of every EMB_FENCE_GROUP-th fence entry */
    const uint8_t *fence; /* n_buckets entries of EMB_FENCE_ENTRY bytes */
    uint64_t n_buckets;
    const uint8_t *area; /* the buckets */
    uint64_t area_len;
    uint64_t n_records; /* rows must be below this */
} emb_index_t;

/* Checks that an index section of `len` bytes holding `n_buckets` buckets and a
 * common prefix of `lcp_len` bytes fits, and fills `ix`.  Constant time: the
 * buckets themselves are checked as lookups read them, and in full by
 * emb_index_check.  Returns EMB_OK or EMB_E_CORRUPT. */
int emb_index_open(emb_index_t *ix, const uint8_t *section, uint64_t len,
                   uint64_t lcp_len, uint64_t n_buckets, uint64_t n_records);

/* Finds `key` (UTF-8 bytes, `klen` long).  Sets *row and returns EMB_OK,
 * returns EMB_NOT_FOUND, or EMB_E_CORRUPT if a bucket it reads is malformed. */
int emb_lookup(const emb_index_t *ix, const uint8_t *key, size_t klen,
               uint64_t *row);

/* A partial copy of a file: have[p] != 0 for each 4096-byte page p (of the
 * file starting at base) that is present.  emb_lookup_probe sets need_first
 * and need_last to the pages of the region it was about to read. */
typedef struct {
    const uint8_t *base;
    const uint8_t *have;
    uint64_t n_pages;
    uint64_t need_first, need_last;
} emb_probe_t;

/* emb_lookup over a partial copy: reads only pages that are present, and
 * returns EMB_NEED (pages in pr->need_*) where it would read one that is not.
 * Once those pages are present, the same call goes on a step further; with
 * every page present it returns what emb_lookup does. */
int emb_lookup_probe(const emb_index_t *ix, emb_probe_t *pr,
                     const uint8_t *key, size_t klen, uint64_t *row);

/* Looks up k keys; on the first key that is missing or hits corruption,
 * stores its position in *failed and returns that status. */
int emb_lookup_many(const emb_index_t *ix, const uint8_t *const *keys,
                    const size_t *lens, size_t k, uint64_t *rows,
                    size_t *failed);

/* Copies n bytes from src to dst (not overlapping) in address order.  Not
 * glibc's memcpy alone: it copies a large block as four interleaved streams,
 * which defeats read-ahead on a cold mapping, and on some CPUs (AMD Zen) its
 * `rep movsb` runs at half speed unless dst and src are alike modulo 64, as a
 * numpy array's data (16 past a page) and a page-aligned record are not. */
void emb_copy(uint8_t *dst, const uint8_t *src, size_t n);

/* Copies records rows[0..k) of `record_bytes` each into dst, in that order.
 * The records are spread over n_shards mapped arrays: global row r lives in
 * shard s where starts[s] <= r < starts[s + 1], at bases[s] + (r - starts[s])
 * * record_bytes; starts has n_shards + 1 ascending entries, starts[0] = 0.
 * Returns EMB_E_RANGE (having copied the rows before it) at a row past
 * starts[n_shards], else EMB_OK. */
int emb_gather(const uint8_t *const *bases, const uint64_t *starts,
               size_t n_shards, uint64_t record_bytes, const uint64_t *rows,
               size_t k, uint8_t *dst);

/* Ragged records (FORMAT.md "Ragged records"): record i of part s owns rows
 * ranges[s][i - starts[s]] to the next one of that part, the ranges an array
 * of (count + 1) little-endian u64 starting at 0, each record at least one
 * row and part s holding part_rows[s] rows.  emb_extents writes the first row
 * (part-local) and the length of each of records items[0..k) and returns
 * EMB_E_RANGE for a record past starts[n_parts], EMB_E_CORRUPT for ranges
 * out of order or past the part's rows (checked for every record asked). */
int emb_extents(const uint8_t *const *ranges, const uint64_t *starts,
                const uint64_t *part_rows, size_t n_parts,
                const uint64_t *items, size_t k, uint64_t *first,
                uint64_t *length);

/* Copies the rows of records items[0..k) (extents from emb_extents) into
 * dst: record i at row i * stride of dst (and with zero_pad, zeros in the
 * rest of its stride rows), or with stride 0 right after the record before
 * it (packed). */
void emb_gather_ragged(const uint8_t *const *bases, const uint64_t *starts,
                       size_t n_parts, uint64_t record_bytes,
                       const uint64_t *items, const uint64_t *first,
                       const uint64_t *length, size_t k, uint64_t stride,
                       int zero_pad, uint8_t *dst);

/* Search (search.c): out[j * ld + r] = the dot product of row r of x (n rows
 * of dim elements of type `kind`, `stride` bytes apart: back to back, or the
 * leading dim values of longer records) with query j of q (nq rows of dim
 * float32), accumulated in float32; the rows split over `threads` threads.
 * Returns EMB_OK, or EMB_E_RANGE for a kind it does not know or rows closer
 * than their length. */
enum { EMB_DOT_F32, EMB_DOT_F16, EMB_DOT_BF16, EMB_DOT_I8, EMB_DOT_U8 };
int emb_dot(const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride, int kind,
            const float *q, uint32_t nq, float *out, uint64_t ld, int threads);

/* Search (search.c): out[j * ld + r] = the bits that differ between row r of
 * x (n rows of nbytes bytes of packed bits, `stride` bytes apart) and query j
 * of q (nq rows of nbytes), as a float32 (exact up to 2^24); the rows split
 * over `threads` threads. */
void emb_hamming(const uint8_t *x, uint64_t n, uint32_t nbytes, uint64_t stride, const uint8_t *q, uint32_t nq,
                 float *out, uint64_t ld, int threads);

/* Search (search.c): float16 values src[0..n) as float32 in dst, over
 * `threads` threads. */
void emb_widen_f16(const uint8_t *src, uint64_t n, float *dst, int threads);

/* Pooling (pool.c): out[r * dim ...] = the mean (EMB_POOL_MEAN, summed in
 * float64) or the maximum (EMB_POOL_MAX; NaN if any row holds NaN there) of
 * rows offsets[r] to offsets[r + 1] of x (rows of dim elements of type `kind`,
 * EMB_DOT_*, back to back), for records r < n; the caller checks that the
 * offsets rise strictly and stay inside x.  The records are split over
 * `threads` threads.  Returns EMB_OK, EMB_E_RANGE for a kind or `how` it does
 * not know, or EMB_E_NOMEM. */
enum { EMB_POOL_MEAN, EMB_POOL_MAX };
int emb_pool(const uint8_t *x, uint32_t dim, int kind, const int64_t *offsets, uint64_t n, int how,
             float *out, int threads);

/* Search (search.c): merges a block of scores into a running top-k per query.
 * Query j's score of row i (dataset row rows[i]) is scores[j * ld + i]; its
 * heap of count[j] <= k entries is heap_scores/heap_rows[j * k ...], the worst
 * kept at the root.  Larger scores are better (smaller if `smaller`; the heap
 * then holds negated scores); NaN is worse than any number; between equal
 * scores the lower row is better, so rows must arrive in ascending order.
 * The queries are split over `threads` threads. */
void emb_topk_merge(const float *scores, uint64_t ld, uint64_t n, uint32_t nq,
                    const int64_t *rows, uint32_t k, int smaller,
                    float *heap_scores, int64_t *heap_rows, uint32_t *count, int threads);

/* Shuffling (shuffle.c): a seed for stream `stream` of epoch `epoch` of a run
 * seeded `seed`, and an in-place uniform shuffle of items[0..n) driven by it. */
uint64_t emb_stream_seed(uint64_t seed, uint64_t epoch, uint64_t stream);
void emb_shuffle(uint64_t *items, uint64_t n, uint64_t seed);

/* CRC-32C (Castagnoli), chained like zlib's crc32: emb_crc32c(0, ...) starts. */
uint32_t emb_crc32c(uint32_t crc, const uint8_t *p, size_t len);

/* CRC-32C of each `block`-byte block of p[0..len) (the last may be short). */
void emb_crc32c_blocks(const uint8_t *p, uint64_t len, uint64_t block,
                       uint32_t *out);

/* Writer: sorts the rows 0..n-1 by their keys (bytewise; key r is
 * heap[offsets[r] .. offsets[r+1])) into perm.  Returns EMB_E_DUPLICATE with
 * the two rows in *dup if two keys are equal, EMB_E_NOMEM, or EMB_OK. */
int emb_sort_keys(const uint8_t *heap, const uint64_t *offsets, uint64_t n,
                  uint64_t *perm, uint64_t dup[2]);

/* Writer: lays out the index section for keys in sorted order `perm`.  With
 * out == NULL only computes *out_len; otherwise writes exactly *out_len bytes
 * (as computed by a first call) to out.  Sets *n_buckets and *lcp_len. */
int emb_index_build(const uint8_t *heap, const uint64_t *offsets,
                    const uint64_t *perm, uint64_t n, uint32_t bucket_keys,
                    uint8_t *out, uint64_t *out_len, uint64_t *n_buckets,
                    uint64_t *lcp_len);

/* Verify: walks the whole index and checks every invariant of FORMAT.md
 * (buckets well formed, keys strictly increasing, prefixes right, every row
 * exactly once, each key equal to the row-order key section).  `seen` is a
 * zeroed bitmap of at least ceil(n_records / 8) bytes.  On failure stores the
 * sorted position where it stopped in *where. */
int emb_index_check(const emb_index_t *ix, const uint8_t *key_offsets,
                    const uint8_t *key_bytes, uint64_t key_bytes_len,
                    uint8_t *seen, uint64_t *where);

#endif
