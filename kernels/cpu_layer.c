/* One decoder layer of a decode step in one call (kernels/cpu.py `decode_layer`), for a layer whose
 * store is dense paged K/V in the model's dtype.
 *
 * The per-op native path (kvchat/engine/forward.py `_decode_native`) makes ~15 calls a layer from
 * Python: matmuls, RoPE, the append's copies, attention, norms, the activation, each with its tensor
 * allocations and ctypes marshalling. At batch 1 on a 2-core machine those calls cost about as much as
 * the attention itself. Here the same functions run in the same order on the same arguments, so the
 * result is bit for bit the per-op path's; only the Python between them is gone:
 *
 *   in   = h @ w_in^T              (fused Q/K/V, or Q only for a layer reading another layer's store)
 *   qk   = RoPE of the Q and K heads of `in`
 *   append K (rotated), V, the position and a zero logit bias at flat rows `rows` (when rows != NULL)
 *   attn = paged decode attention of the Q heads (column sums into `colsum` when it is not NULL: written,
 *          or added into a method's running scores, `cs_rows`)
 *   x   += attn @ w_o^T;  h = RMSNorm_post(x)
 *   x   += (silu(gate) * up)(h @ w_gu^T) @ w_down^T;  h = RMSNorm_next(x)
 *
 * x and h (B, hidden) are updated in place: h ends as the next layer's normed input. `work` holds the
 * intermediates, B * (n_in + (Hq + Hkv) D + Hq D + 2 hidden + 3 inter) elements of the model dtype.
 * Nothing here depends on Python or torch.
 */
#include "cpu_common.h"

void kv_linear(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N, int64_t K, int dt);
void kv_add_rms_norm(void *x, const void *delta, const void *w, void *out, int64_t rows, int64_t dim, float eps,
                     int dt);
void kv_rope(const void *x, int64_t x_stride, const void *cos, const void *sin_s, void *out, int64_t rows,
             int64_t heads, int64_t D, int dt);
void kv_silu_mul(const void *gu, void *out, int64_t rows, int64_t inter, int dt);
void kv_decode_attention(const void *q, int64_t q_stride, const void *k_pool, const void *v_pool,
                         const int32_t *table, const int32_t *lengths, const float *bias, void *out, float *probs,
                         float *colsum, const int64_t *cs_rows, int64_t cs_cap, float *part, int64_t B, int64_t Hq,
                         int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, int64_t n_tab, int64_t uniform,
                         int64_t splits, int want_probs, float scale, int dt);

/* The layout of kernels/cpu.py's `Layer` (a ctypes Structure): keep the two in the same order. */
typedef struct {
    /* weights: row-major (out, in), biases may be NULL */
    const void *w_in, *b_in, *w_o, *b_o, *w_gu, *b_gu, *w_down, *b_down, *post_w, *next_w;
    float post_eps, next_eps;
    int64_t hidden, n_in, Hq, Hkv, D, inter;
    /* the store the layer reads, and appends to when rows != NULL */
    void *k_pool, *v_pool;
    int32_t *pos_pool;
    float *bias_pool;
    const int64_t *rows;     /* (B, Hkv) flat token rows of the pools */
    const int32_t *positions; /* (B,) */
    const int32_t *table, *lengths;
    int64_t bs, max_blocks, n_tab, uniform, splits;
    float *probs, *colsum, *part, scale;
    const int64_t *cs_rows; /* NULL: colsum (B, Hkv, T) written; else added into rows cs_rows[b] of (n, Hkv, cs_cap) */
    int64_t cs_cap;
    /* the step */
    int64_t B;
    const void *cos, *sin_s;
    void *work;
    int32_t dt;
} kv_layer;

void kv_decode_layer(const kv_layer *L, void *x, void *h) {
    const int dt = L->dt;
    const int64_t B = L->B, D = L->D, Hq = L->Hq, Hkv = L->Hkv, es = dt ? 2 : 4;
    const int64_t heads = L->rows ? Hq + Hkv : Hq; /* RoPE: Q and K heads, or Q only */
    char *in = L->work, *qk = in + B * L->n_in * es, *attn = qk + B * heads * D * es;
    char *o = attn + B * Hq * D * es, *gu = o + B * L->hidden * es, *act = gu + B * 2 * L->inter * es;
    char *dn = act + B * L->inter * es;

    kv_linear(h, L->w_in, L->b_in, in, B, L->n_in, L->hidden, dt);
    kv_rope(in, L->n_in, L->cos, L->sin_s, qk, B, heads, D, dt);
    if (L->rows) {
        const int64_t row_bytes = D * es;
        for (int64_t b = 0; b < B; b++)
            for (int64_t k = 0; k < Hkv; k++) {
                int64_t r = L->rows[b * Hkv + k];
                memcpy((char *)L->k_pool + r * row_bytes, qk + ((b * heads + Hq + k) * D) * es, (size_t)row_bytes);
                memcpy((char *)L->v_pool + r * row_bytes, in + (b * L->n_in + (Hq + Hkv) * D + k * D) * es,
                       (size_t)row_bytes);
                L->pos_pool[r] = L->positions[b];
                if (L->bias_pool) L->bias_pool[r] = 0.f;
            }
    }
    kv_decode_attention(qk, heads * D, L->k_pool, L->v_pool, L->table, L->lengths, L->bias_pool, attn, L->probs,
                        L->colsum, L->cs_rows, L->cs_cap, L->part, B, Hq, Hkv, D, L->bs, L->max_blocks, L->n_tab,
                        L->uniform, L->splits, L->colsum != NULL, L->scale, dt);
    kv_linear(attn, L->w_o, L->b_o, o, B, L->hidden, Hq * D, dt);
    kv_add_rms_norm(x, o, L->post_w, h, B, L->hidden, L->post_eps, dt);
    kv_linear(h, L->w_gu, L->b_gu, gu, B, 2 * L->inter, L->hidden, dt);
    kv_silu_mul(gu, act, B, L->inter, dt);
    kv_linear(act, L->w_down, L->b_down, dn, B, L->hidden, L->inter, dt);
    kv_add_rms_norm(x, dn, L->next_w, h, B, L->hidden, L->next_eps, dt);
}

/* Layers L[0..n) one after another (a run of layers no method needs to see between): one call from
 * Python for the run, so the interpreter's work between layers, slow with its data pushed out of the
 * caches by each layer's weights, is done once before it. */
void kv_decode_layers(const kv_layer *const *L, int64_t n, void *x, void *h) {
    for (int64_t i = 0; i < n; i++) kv_decode_layer(L[i], x, h);
}
