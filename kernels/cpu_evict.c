/* D2O's eviction on a paged store, one (slot, layer) in two calls (kernels/cpu_evict.py): the evicted keys'
 * best cosine against the kept keys, then the merges and the compaction in place. The torch path
 * (kvchat/methods/d2o.py `_evict`: a read of every head, gathers of kept and evicted rows, ~50 small ops and
 * three copies of the layer's tokens) took ~2.5 ms an eviction for ~1,400 tokens x 3 heads, which D2O at
 * 4,096 tokens x batch 4 pays ~110 times in 200 steps.
 *
 * Rows are addressed through the slot's block table: storage index i of head h is row i % bs of block
 * table[h, i / bs]. The results are the torch path's bit for bit: a merged row is
 * (self_w x kept + sum_j (w_j x ev_j)) / (self_w + sum_j w_j) in float32, the sums taken in the evicted
 * tokens' order (as index_add_ does), each product rounded before its add (the library is built with
 * -std=c11: no contraction into fused multiply-adds), then rounded to the pool's dtype. */
#include "cpu_common.h"

int64_t kv_max_cosine_scratch(int64_t g, int64_t C, int64_t D);
void kv_max_cosine(const void *a, const void *b, int64_t g, int64_t E, int64_t C, int64_t D, float *best, int64_t *idx,
                   void *scratch, int dt);

static inline char *row_at(void *pool, const int32_t *table, int64_t MB, int64_t bs, int64_t rb, int64_t h,
                           int64_t i) {
    return (char *)pool + ((int64_t)table[h * MB + i / bs] * bs + i % bs) * rb;
}

/* out (H, m, row bytes rb): rows idx[h, :m] of each head */
static void gather(const void *pool, const int32_t *table, int64_t MB, int64_t bs, int64_t rb, int64_t H, int64_t m,
                   const int64_t *idx, char *out) {
    for (int64_t h = 0; h < H; h++)
        for (int64_t j = 0; j < m; j++)
            memcpy(out + (h * m + j) * rb, row_at((void *)pool, table, MB, bs, rb, h, idx[h * m + j]), (size_t)rb);
}

static int64_t up64(int64_t n) { return (n + 63) / 64 * 64; }

int64_t kv_paged_max_cosine_scratch(int64_t H, int64_t C, int64_t E, int64_t D, int dt) {
    return up64(H * (C + E) * D * (dt ? 2 : 4)) + kv_max_cosine_scratch(H, C, D);
}

/* k_pool (n_blocks, bs, D) of dtype dt; table (H, MB) int32, the slot's rows; keep (H, C) and gone (H, E) storage
 * indices -> best (H, E) float32, idx (H, E) int64 (into keep): `kv_max_cosine` of the gathered rows. */
void kv_paged_max_cosine(const void *k_pool, const int32_t *table, int64_t MB, int64_t bs, int64_t H, int64_t C,
                         int64_t E, int64_t D, const int64_t *keep, const int64_t *gone, float *best, int64_t *idx,
                         void *scratch, int dt) {
    const int64_t rb = D * (dt ? 2 : 4);
    char *kept = (char *)scratch, *ev = kept + H * C * rb;
    gather(k_pool, table, MB, bs, rb, H, C, keep, kept);
    gather(k_pool, table, MB, bs, rb, H, E, gone, ev);
    kv_max_cosine(ev, kept, H, E, C, D, best, idx, kept + up64(H * (C + E) * rb), dt);
}

/* pools[p] (n_blocks, bs, row_bytes[p] bytes a row), pools[0] and pools[1] the keys and values (D elements of
 * dtype dt). Per head h: every evicted token j (storage index gone[h, j]) with w[h, j] > 0 merges into kept
 * token into[h, j] (storage index keep[h, into[h, j]]); then kept token c moves to storage index c in every
 * pool (keep sorted: a row only ever moves down, over rows already moved or dropped). A kept token's own weight
 * is self_ws[h] when self_ws is given (RazorAttention: the count its compensation token stands for), else
 * self_w. scratch: C x (2D + 2) floats. */
void kv_merge_compact(void **pools, const int64_t *row_bytes, int64_t n_pools, const int32_t *table, int64_t MB,
                      int64_t bs, int64_t H, int64_t C, int64_t E, int64_t D, const int64_t *keep, const int64_t *gone,
                      const int64_t *into, const float *w, float self_w, const float *self_ws, float *scratch, int dt) {
    float *nk = scratch, *nv = nk + C * D, *den = nv + C * D, *hit = den + C;
    for (int64_t h = 0; h < H; h++) {
        const int64_t *kp = keep + h * C;
        const float sw = self_ws != NULL ? self_ws[h] : self_w;
        if (w != NULL) {
            for (int64_t c = 0; c < C; c++) hit[c] = 0.f;
            for (int64_t j = 0; j < E; j++) {
                const float wj = w[h * E + j];
                if (!(wj > 0.f)) continue;
                const int64_t c = into[h * E + j];
                float *ak = nk + c * D, *av = nv + c * D;
                if (hit[c] == 0.f) {
                    const void *rk = row_at(pools[0], table, MB, bs, row_bytes[0], h, kp[c]);
                    const void *rv = row_at(pools[1], table, MB, bs, row_bytes[1], h, kp[c]);
                    for (int64_t d = 0; d < D; d++) ak[d] = sw * ld(rk, d, dt), av[d] = sw * ld(rv, d, dt);
                    den[c] = sw;
                    hit[c] = 1.f;
                }
                const void *ek = row_at(pools[0], table, MB, bs, row_bytes[0], h, gone[h * E + j]);
                const void *evv = row_at(pools[1], table, MB, bs, row_bytes[1], h, gone[h * E + j]);
                for (int64_t d = 0; d < D; d++) {
                    float pk = wj * ld(ek, d, dt), pv = wj * ld(evv, d, dt);
                    ak[d] += pk;
                    av[d] += pv;
                }
                den[c] += wj;
            }
            for (int64_t c = 0; c < C; c++) {
                if (hit[c] == 0.f) continue;
                void *rk = row_at(pools[0], table, MB, bs, row_bytes[0], h, kp[c]);
                void *rv = row_at(pools[1], table, MB, bs, row_bytes[1], h, kp[c]);
                for (int64_t d = 0; d < D; d++) st(rk, d, nk[c * D + d] / den[c], dt), st(rv, d, nv[c * D + d] / den[c], dt);
            }
        }
        for (int64_t c = 0; c < C; c++) {
            if (kp[c] == c) continue;
            for (int64_t p = 0; p < n_pools; p++)
                memcpy(row_at(pools[p], table, MB, bs, row_bytes[p], h, c),
                       row_at(pools[p], table, MB, bs, row_bytes[p], h, kp[c]), (size_t)row_bytes[p]);
        }
    }
}

/* 1 when the first n rows of every head h > 0 of a slot hold head 0's bytes, else 0: pool (n_blocks, bs, rb
 * bytes a row) read through the slot's table (H, MB). A block's rows are contiguous, so a block is one compare.
 * D2O and the other per-layer policies ask it of the positions pool before scoring a layer's heads together. */
int32_t kv_same_rows(const void *pool, const int32_t *table, int64_t MB, int64_t bs, int64_t rb, int64_t H, int64_t n) {
    for (int64_t h = 1; h < H; h++)
        for (int64_t i = 0; i < n; i += bs) {
            const int64_t m = n - i < bs ? n - i : bs;
            if (memcmp(row_at((void *)pool, table, MB, bs, rb, h, i), row_at((void *)pool, table, MB, bs, rb, 0, i),
                       (size_t)(m * rb)) != 0)
                return 0;
        }
    return 1;
}
