# cython: language_level=3
"""The C core's API, declared once (src_c/embfile.h)."""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t


cdef extern from "embfile.h" nogil:
    int EMB_OK, EMB_NOT_FOUND, EMB_NEED, EMB_E_CORRUPT, EMB_E_DUPLICATE, EMB_E_NOMEM, EMB_E_LIMIT, EMB_E_RANGE
    unsigned int EMB_MAX_KEY_BYTES

    ctypedef struct emb_index_t:
        uint64_t n_buckets
        uint64_t n_records

    int emb_index_open(emb_index_t *ix, const uint8_t *section, uint64_t len,
                       uint64_t lcp_len, uint64_t n_buckets, uint64_t n_records)
    int emb_lookup(const emb_index_t *ix, const uint8_t *key, size_t klen, uint64_t *row)

    ctypedef struct emb_probe_t:
        const uint8_t *base
        const uint8_t *have
        uint64_t n_pages
        uint64_t need_first, need_last

    int emb_lookup_probe(const emb_index_t *ix, emb_probe_t *pr, const uint8_t *key, size_t klen,
                         uint64_t *row)
    int emb_lookup_many(const emb_index_t *ix, const uint8_t *const *keys,
                        const size_t *lens, size_t k, uint64_t *rows, size_t *failed)
    void emb_copy(uint8_t *dst, const uint8_t *src, size_t n)
    int emb_gather(const uint8_t *const *bases, const uint64_t *starts, size_t n_shards,
                   uint64_t record_bytes, const uint64_t *rows, size_t k, uint8_t *dst)
    int emb_extents(const uint8_t *const *ranges, const uint64_t *starts, const uint64_t *part_rows,
                    size_t n_parts, const uint64_t *items, size_t k, uint64_t *first, uint64_t *length)
    void emb_gather_ragged(const uint8_t *const *bases, const uint64_t *starts, size_t n_parts,
                           uint64_t record_bytes, const uint64_t *items, const uint64_t *first,
                           const uint64_t *length, size_t k, uint64_t stride, int zero_pad, uint8_t *dst)
    enum:
        EMB_DOT_F32, EMB_DOT_F16, EMB_DOT_BF16, EMB_DOT_I8, EMB_DOT_U8
    int emb_dot(const uint8_t *x, uint64_t n, uint32_t dim, uint64_t stride, int kind, const float *q,
                uint32_t nq, float *out, uint64_t ld, int threads)
    void emb_hamming(const uint8_t *x, uint64_t n, uint32_t nbytes, uint64_t stride, const uint8_t *q, uint32_t nq,
                     float *out, uint64_t ld, int threads)
    void emb_widen_f16(const uint8_t *src, uint64_t n, float *dst, int threads)
    enum:
        EMB_POOL_MEAN, EMB_POOL_MAX
    int emb_pool(const uint8_t *x, uint32_t dim, int kind, const int64_t *offsets, uint64_t n, int how, float *out,
                 int threads)
    void emb_topk_merge(const float *scores, uint64_t ld, uint64_t n, uint32_t nq, const int64_t *rows, uint32_t k,
                        int smaller, float *heap_scores, int64_t *heap_rows, uint32_t *count, int threads)
    uint64_t emb_stream_seed(uint64_t seed, uint64_t epoch, uint64_t stream)
    void emb_shuffle(uint64_t *items, uint64_t n, uint64_t seed)
    uint32_t emb_crc32c(uint32_t crc, const uint8_t *p, size_t len)
    void emb_crc32c_blocks(const uint8_t *p, uint64_t len, uint64_t block, uint32_t *out)
    int emb_sort_keys(const uint8_t *heap, const uint64_t *offsets, uint64_t n,
                      uint64_t *perm, uint64_t dup[2])
    int emb_index_build(const uint8_t *heap, const uint64_t *offsets, const uint64_t *perm,
                        uint64_t n, uint32_t bucket_keys, uint8_t *out, uint64_t *out_len,
                        uint64_t *n_buckets, uint64_t *lcp_len)
    int emb_index_check(const emb_index_t *ix, const uint8_t *key_offsets,
                        const uint8_t *key_bytes, uint64_t key_bytes_len,
                        uint8_t *seen, uint64_t *where)
