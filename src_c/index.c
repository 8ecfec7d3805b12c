/* index.c -- the sorted key index: lookup, build (writer) and full check (verify).
 *
 * Layout (FORMAT.md "Index"): the prefix shared by all keys; a top level
 * holding the first prefix of every EMB_FENCE_GROUP-th fence entry; the fence,
 * one entry per bucket {u64 prefix of its first key, u64 offset of the bucket};
 * then the buckets.  A bucket holds up to a few dozen consecutive keys:
 *
 *     u32 m, u32 0, u64 prefix[m], u64 row[m], u32 key_end[m], pad to 8, keys
 *
 * The top level is small enough to stay cached, a fence group is 512 bytes in
 * one page, and a bucket never straddles a page unless it is larger than one:
 * a warm lookup touches two pages, a cold one reads about one.
 */
#include <stdlib.h>

#include "embfile.h"
#include "internal.h"

#define BUCKET_HEAD 8u
#define BUCKET_ENTRY 20u /* prefix + row + key_end */

typedef struct {
    uint32_t m;
    const uint8_t *prefix, *row, *key_end, *keys;
    uint64_t keys_len;
} bucket_t;

/* A lookup over a partial copy of a file (a remote file's pages fetched so
 * far): before reading a region, have() checks that its pages are present and
 * otherwise records them in pr->need and makes the lookup return EMB_NEED.
 * With pr == NULL (a local file) it costs one predictable branch. */
static int have(emb_probe_t *pr, const uint8_t *p, uint64_t len) {
    uint64_t first, last, pg;
    if (pr == NULL || len == 0)
        return 1;
    first = (uint64_t)(p - pr->base) / EMB_PAGE;
    last = (uint64_t)(p - pr->base + len - 1) / EMB_PAGE;
    for (pg = first; pg <= last; pg++)
        if (pg >= pr->n_pages || !pr->have[pg]) {
            pr->need_first = pg;
            pr->need_last = last;
            return 0;
        }
    return 1;
}

#define HAVE(pr, p, len)          \
    do {                          \
        if (!have(pr, p, len))    \
            return EMB_NEED;      \
    } while (0)

/* Starts fetching the cache lines of p[0..len) together, not one by one. */
static inline void prefetch(const uint8_t *p, uint64_t len) {
    uint64_t j;
    for (j = 0; j < len; j += 64)
        __builtin_prefetch(p + j);
}

static inline uint64_t keys_at(uint64_t m) {
    return emb_align(BUCKET_HEAD + BUCKET_ENTRY * m, 8);
}

/* Where the parts of an index section with this many buckets begin. */
static void layout(uint64_t lcp_len, uint64_t nb, uint64_t *top_at,
                   uint64_t *fence_at, uint64_t *area_at) {
    uint64_t n_top = (nb + EMB_FENCE_GROUP - 1) / EMB_FENCE_GROUP;
    *top_at = emb_align(lcp_len, 8);
    *fence_at = emb_align(*top_at + 8 * n_top, EMB_PAGE);
    *area_at = emb_align(*fence_at + EMB_FENCE_ENTRY * nb, EMB_PAGE);
}

static inline uint64_t top_prefix(const emb_index_t *ix, uint64_t g) {
    return emb_load_u64(ix->top + 8 * g);
}

static inline uint64_t fence_prefix(const emb_index_t *ix, uint64_t b) {
    return emb_load_u64(ix->fence + EMB_FENCE_ENTRY * b);
}

static inline uint64_t fence_offset(const emb_index_t *ix, uint64_t b) {
    return emb_load_u64(ix->fence + EMB_FENCE_ENTRY * b + 8);
}

int emb_index_open(emb_index_t *ix, const uint8_t *section, uint64_t len,
                   uint64_t lcp_len, uint64_t n_buckets, uint64_t n_records) {
    uint64_t top_at, fence_at, area_at;

    if (lcp_len > EMB_MAX_KEY_BYTES || n_buckets > len / EMB_FENCE_ENTRY ||
        n_buckets > n_records || (n_records > 0) != (n_buckets > 0))
        return EMB_E_CORRUPT;
    layout(lcp_len, n_buckets, &top_at, &fence_at, &area_at);
    if (n_buckets ? area_at > len : top_at > len)
        return EMB_E_CORRUPT;
    ix->lcp = section;
    ix->lcp_len = lcp_len;
    ix->top = section + top_at;
    ix->fence = n_buckets ? section + fence_at : section;
    ix->n_buckets = n_buckets;
    ix->area = n_buckets ? section + area_at : section;
    ix->area_len = n_buckets ? len - area_at : 0;
    ix->n_records = n_records;
    return EMB_OK;
}

/* Bounds-checks bucket b against its fence neighbours and the area. */
static int bucket_at(const emb_index_t *ix, uint64_t b, bucket_t *bk,
                     emb_probe_t *pr) {
    uint64_t off, end, m, at;
    const uint8_t *p;

    HAVE(pr, ix->fence + EMB_FENCE_ENTRY * b, EMB_FENCE_ENTRY * (b + 1 < ix->n_buckets ? 2 : 1));
    off = fence_offset(ix, b);
    end = b + 1 < ix->n_buckets ? fence_offset(ix, b + 1) : ix->area_len;
    if (off > end || end > ix->area_len || end - off < BUCKET_HEAD)
        return EMB_E_CORRUPT;
    p = ix->area + off;
    HAVE(pr, p, end - off);
    m = emb_load_u32(p);
    if (m == 0 || m > (end - off) / BUCKET_ENTRY)
        return EMB_E_CORRUPT;
    at = keys_at(m);
    if (at > end - off)
        return EMB_E_CORRUPT;
    bk->m = (uint32_t)m;
    bk->prefix = p + BUCKET_HEAD;
    bk->row = bk->prefix + 8 * m;
    bk->key_end = bk->row + 8 * m;
    bk->keys = p + at;
    bk->keys_len = end - off - at;
    return EMB_OK;
}

/* Key i of a bucket, bounds-checked. */
static inline int bucket_key(const bucket_t *bk, uint32_t i, const uint8_t **k,
                             size_t *len) {
    uint64_t start = i ? emb_load_u32(bk->key_end + 4 * (i - 1)) : 0;
    uint64_t end = emb_load_u32(bk->key_end + 4 * i);
    if (start > end || end > bk->keys_len)
        return EMB_E_CORRUPT;
    *k = bk->keys + start;
    *len = (size_t)(end - start);
    return EMB_OK;
}

static int search_bucket(const emb_index_t *ix, uint64_t b, const uint8_t *key,
                         size_t klen, uint64_t tp, uint64_t *row,
                         emb_probe_t *pr) {
    bucket_t bk;
    uint32_t i;
    uint64_t prev = 0;
    int rc = bucket_at(ix, b, &bk, pr);

    if (rc != EMB_OK)
        return rc;
    for (i = 0; i < bk.m; i++) {
        uint64_t p = emb_load_u64(bk.prefix + 8 * i);
        const uint8_t *k;
        size_t len;
        int c;

        if (p < prev)
            return EMB_E_CORRUPT; /* sortedness, where it is read */
        prev = p;
        if (p < tp)
            continue;
        if (p > tp)
            return EMB_NOT_FOUND;
        if ((rc = bucket_key(&bk, i, &k, &len)) != EMB_OK)
            return rc;
        c = emb_key_cmp(k, len, key, klen);
        if (c < 0)
            continue;
        if (c > 0)
            return EMB_NOT_FOUND;
        *row = emb_load_u64(bk.row + 8 * i);
        return *row < ix->n_records ? EMB_OK : EMB_E_CORRUPT;
    }
    return EMB_NOT_FOUND;
}

/* Compares key with the first key of bucket b: <0, 0, >0, or EMB cmp error via *rc. */
static int cmp_first(const emb_index_t *ix, uint64_t b, const uint8_t *key,
                     size_t klen, int *rc, emb_probe_t *pr) {
    bucket_t bk;
    const uint8_t *k;
    size_t len;

    if ((*rc = bucket_at(ix, b, &bk, pr)) != EMB_OK ||
        (*rc = bucket_key(&bk, 0, &k, &len)) != EMB_OK)
        return 0;
    return emb_key_cmp(key, klen, k, len);
}

static int lookup(const emb_index_t *ix, const uint8_t *key, size_t klen,
                  uint64_t *row, emb_probe_t *pr) {
    uint64_t nb = ix->n_buckets, base = 0, len = nb, tp, lo, hi;
    int rc = EMB_OK;

    if (nb == 0)
        return EMB_NOT_FOUND;
    HAVE(pr, ix->lcp, ix->lcp_len);
    if (klen < ix->lcp_len || memcmp(key, ix->lcp, ix->lcp_len))
        return EMB_NOT_FOUND;
    tp = emb_prefix(key + ix->lcp_len, klen - ix->lcp_len);

    /* Last bucket whose first prefix <= tp: branch-free halving over the
     * top level, then over one fence group (its lines fetched together). */
    len = (nb + EMB_FENCE_GROUP - 1) / EMB_FENCE_GROUP;
    HAVE(pr, ix->top, 8 * len);
    while (len > 1) {
        uint64_t half = len / 2;
        base = top_prefix(ix, base + half) <= tp ? base + half : base;
        len -= half;
    }
    base *= EMB_FENCE_GROUP;
    len = nb - base < EMB_FENCE_GROUP ? nb - base : EMB_FENCE_GROUP;
    /* the group and the entry after it, which ends the last bucket's extent */
    HAVE(pr, ix->fence + EMB_FENCE_ENTRY * base, EMB_FENCE_ENTRY * (len + (base + len < nb)));
    prefetch(ix->fence + EMB_FENCE_ENTRY * base, EMB_FENCE_ENTRY * len);
    while (len > 1) {
        uint64_t half = len / 2;
        base = fence_prefix(ix, base + half) <= tp ? base + half : base;
        len -= half;
    }
    if (fence_prefix(ix, base) > tp)
        return EMB_NOT_FOUND; /* smaller than every key */
    if (fence_prefix(ix, base) == tp) {
        /* A run of buckets starts with this prefix (long shared prefixes):
         * settle among them, and the bucket before, on whole keys. */
        /* The first bucket of the run: gallop back from base (the run is
         * usually base alone, and its neighbours share base's pages), then
         * halve what is left. */
        uint64_t step = 1;
        lo = hi = base;
        while (lo > 0) {
            uint64_t at = lo > step ? lo - step : 0;
            HAVE(pr, ix->fence + EMB_FENCE_ENTRY * at, 8);
            if (fence_prefix(ix, at) < tp) {
                lo = at + 1;
                break;
            }
            hi = lo = at;
            step *= 2;
        }
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            HAVE(pr, ix->fence + EMB_FENCE_ENTRY * mid, 8);
            if (fence_prefix(ix, mid) < tp)
                lo = mid + 1;
            else
                hi = mid;
        }
        hi = base + 1; /* search [lo, hi) for the last first-key <= key */
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            int c = cmp_first(ix, mid, key, klen, &rc, pr);
            if (rc != EMB_OK)
                return rc;
            if (c >= 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo == 0)
            return EMB_NOT_FOUND;
        base = lo - 1;
    }
    {
        uint64_t off = fence_offset(ix, base);
        if (off < ix->area_len)
            prefetch(ix->area + off, ix->area_len - off < 512 ? ix->area_len - off : 512);
    }
    return search_bucket(ix, base, key, klen, tp, row, pr);
}

int emb_lookup(const emb_index_t *ix, const uint8_t *key, size_t klen,
               uint64_t *row) {
    return lookup(ix, key, klen, row, NULL);
}

int emb_lookup_probe(const emb_index_t *ix, emb_probe_t *pr,
                     const uint8_t *key, size_t klen, uint64_t *row) {
    return lookup(ix, key, klen, row, pr);
}

int emb_lookup_many(const emb_index_t *ix, const uint8_t *const *keys,
                    const size_t *lens, size_t k, uint64_t *rows,
                    size_t *failed) {
    size_t i;
    for (i = 0; i < k; i++) {
        int rc = emb_lookup(ix, keys[i], lens[i], &rows[i]);
        if (rc != EMB_OK) {
            *failed = i;
            return rc;
        }
    }
    return EMB_OK;
}

/* ---- writer: sort and build ------------------------------------------ */

typedef struct {
    const uint8_t *heap;
    const uint64_t *offsets;
    const uint64_t *pref;
} sort_ctx_t;

static inline int row_cmp(const sort_ctx_t *s, uint64_t a, uint64_t b) {
    if (s->pref[a] != s->pref[b])
        return s->pref[a] < s->pref[b] ? -1 : 1;
    return emb_key_cmp(s->heap + s->offsets[a], s->offsets[a + 1] - s->offsets[a],
                       s->heap + s->offsets[b], s->offsets[b + 1] - s->offsets[b]);
}

int emb_sort_keys(const uint8_t *heap, const uint64_t *offsets, uint64_t n,
                  uint64_t *perm, uint64_t dup[2]) {
    uint64_t *tmp = NULL, *pref = NULL, *src = perm, *dst, width, i;
    sort_ctx_t s;
    int rc = EMB_OK;

    for (i = 0; i < n; i++) {
        perm[i] = i;
        if (offsets[i + 1] - offsets[i] > EMB_MAX_KEY_BYTES) {
            dup[0] = dup[1] = i;
            return EMB_E_LIMIT;
        }
    }
    if (n < 2)
        return EMB_OK;
    tmp = malloc(n * sizeof *tmp);
    pref = malloc(n * sizeof *pref);
    if (!tmp || !pref) {
        rc = EMB_E_NOMEM;
        goto done;
    }
    for (i = 0; i < n; i++)
        pref[i] = emb_prefix(heap + offsets[i], offsets[i + 1] - offsets[i]);
    s.heap = heap, s.offsets = offsets, s.pref = pref;

    /* Bottom-up merge sort: O(n log n) whatever the keys, stable. */
    dst = tmp;
    for (width = 1; width < n; width *= 2) {
        uint64_t lo;
        for (lo = 0; lo < n; lo += 2 * width) {
            uint64_t mid = lo + width < n ? lo + width : n;
            uint64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            uint64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                dst[o++] = row_cmp(&s, src[b], src[a]) < 0 ? src[b++] : src[a++];
            while (a < mid)
                dst[o++] = src[a++];
            while (b < hi)
                dst[o++] = src[b++];
        }
        { uint64_t *t = src; src = dst; dst = t; }
    }
    if (src != perm)
        memcpy(perm, src, n * sizeof *perm);
    for (i = 1; i < n; i++) {
        if (row_cmp(&s, perm[i - 1], perm[i]) == 0) {
            dup[0] = perm[i - 1] < perm[i] ? perm[i - 1] : perm[i];
            dup[1] = perm[i - 1] < perm[i] ? perm[i] : perm[i - 1];
            rc = EMB_E_DUPLICATE;
            break;
        }
    }
done:
    free(tmp);
    free(pref);
    return rc;
}

int emb_index_build(const uint8_t *heap, const uint64_t *offsets,
                    const uint64_t *perm, uint64_t n, uint32_t bucket_keys,
                    uint8_t *out, uint64_t *out_len, uint64_t *n_buckets,
                    uint64_t *lcp_len) {
    uint64_t lcp = 0, nb = 0, pos = 0, i = 0, top_at, fence_at, area_at;

    if (bucket_keys == 0)
        return EMB_E_LIMIT;
    if (n > 0) {
        /* The common prefix of all keys is that of the first and the last. */
        const uint8_t *a = heap + offsets[perm[0]], *z = heap + offsets[perm[n - 1]];
        uint64_t la = offsets[perm[0] + 1] - offsets[perm[0]];
        uint64_t lz = offsets[perm[n - 1] + 1] - offsets[perm[n - 1]];
        while (lcp < la && lcp < lz && a[lcp] == z[lcp])
            lcp++;
    }
    /* First pass counts buckets so the fence size (and the area start) is known. */
    for (int pass = 0; pass < 2; pass++) {
        layout(lcp, nb, &top_at, &fence_at, &area_at);
        if (pass == 1 && out) {
            memset(out, 0, *out_len);
            memcpy(out, heap + (n ? offsets[perm[0]] : 0), lcp);
        }
        pos = 0, i = 0;
        uint64_t b = 0;
        while (i < n) {
            uint64_t m = 0, kb = 0, size;
            /* Greedy: up to bucket_keys keys, within a page when they fit. */
            while (i + m < n && m < bucket_keys) {
                uint64_t r = perm[i + m], l = offsets[r + 1] - offsets[r];
                if (m > 0 && keys_at(m + 1) + kb + l > EMB_PAGE)
                    break;
                kb += l, m++;
            }
            size = emb_align(keys_at(m) + kb, 8);
            if (size > EMB_PAGE || pos % EMB_PAGE + size > EMB_PAGE)
                pos = emb_align(pos, EMB_PAGE);
            if (pass == 1 && out) {
                uint8_t *f = out + fence_at + EMB_FENCE_ENTRY * b;
                uint8_t *p = out + area_at + pos, *k = p + keys_at(m);
                uint64_t j, end = 0;
                emb_store_u32(p, (uint32_t)m);
                for (j = 0; j < m; j++) {
                    uint64_t r = perm[i + j], l = offsets[r + 1] - offsets[r];
                    const uint8_t *key = heap + offsets[r];
                    uint64_t pre = emb_prefix(key + lcp, l - lcp);
                    if (j == 0) {
                        emb_store_u64(f, pre);
                        emb_store_u64(f + 8, pos);
                        if (b % EMB_FENCE_GROUP == 0)
                            emb_store_u64(out + top_at + 8 * (b / EMB_FENCE_GROUP), pre);
                    }
                    emb_store_u64(p + BUCKET_HEAD + 8 * j, pre);
                    emb_store_u64(p + BUCKET_HEAD + 8 * (m + j), r);
                    memcpy(k + end, key, l);
                    end += l;
                    emb_store_u32(p + BUCKET_HEAD + 16 * m + 4 * j, (uint32_t)end);
                }
            }
            pos += size, i += m, b++;
        }
        nb = b;
    }
    *n_buckets = nb;
    *lcp_len = lcp;
    if (out == NULL)
        *out_len = n ? area_at + pos : top_at;
    return EMB_OK;
}

/* ---- verify ---------------------------------------------------------- */

int emb_index_check(const emb_index_t *ix, const uint8_t *key_offsets,
                    const uint8_t *key_bytes, uint64_t key_bytes_len,
                    uint8_t *seen, uint64_t *where) {
    const uint8_t *prev = NULL;
    size_t prev_len = 0;
    uint64_t b, pos = 0, last_off = 0;

    for (b = 0; b < ix->n_buckets; b++) {
        bucket_t bk;
        uint32_t i;
        uint64_t off = fence_offset(ix, b);

        *where = pos;
        if ((b > 0 && off <= last_off) || bucket_at(ix, b, &bk, NULL) != EMB_OK)
            return EMB_E_CORRUPT;
        last_off = off;
        for (i = 0; i < bk.m; i++, pos++) {
            const uint8_t *k, *ref;
            size_t len;
            uint64_t row = emb_load_u64(bk.row + 8 * i), ks, ke;

            *where = pos;
            if (pos >= ix->n_records || bucket_key(&bk, i, &k, &len) != EMB_OK)
                return EMB_E_CORRUPT;
            if (len < ix->lcp_len || memcmp(k, ix->lcp, ix->lcp_len) != 0)
                return EMB_E_CORRUPT;
            {
                uint64_t pre = emb_prefix(k + ix->lcp_len, len - ix->lcp_len);
                if (emb_load_u64(bk.prefix + 8 * i) != pre ||
                    (i == 0 && fence_prefix(ix, b) != pre) ||
                    (i == 0 && b % EMB_FENCE_GROUP == 0 &&
                     top_prefix(ix, b / EMB_FENCE_GROUP) != pre))
                    return EMB_E_CORRUPT;
            }
            if (prev && emb_key_cmp(prev, prev_len, k, len) >= 0)
                return EMB_E_CORRUPT;
            if (row >= ix->n_records || (seen[row / 8] >> (row % 8)) & 1)
                return EMB_E_CORRUPT;
            seen[row / 8] |= (uint8_t)(1u << (row % 8));
            ks = emb_load_u64(key_offsets + 8 * row);
            ke = emb_load_u64(key_offsets + 8 * (row + 1));
            if (ks > ke || ke > key_bytes_len || ke - ks != len)
                return EMB_E_CORRUPT;
            ref = key_bytes + ks;
            if (memcmp(ref, k, len) != 0)
                return EMB_E_CORRUPT;
            prev = k, prev_len = len;
        }
    }
    *where = pos;
    return pos == ix->n_records ? EMB_OK : EMB_E_CORRUPT;
}
