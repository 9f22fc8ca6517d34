/* kvchat's CPU decode attention over the paged store (kernels/cpu.py `decode_attention`; the layout
 * and contract of kernels/paged_attention.py). Built with cpu_ops.c into one library. */
#include "cpu_common.h"

/* q . k and acc += p v over D values (float32 arithmetic), with AVX-512 where the CPU has it: the
 * auto-vectorized loops spend more on loop set-up and the reduction than on the 64 products. */
static inline __attribute__((always_inline)) float dot_f32(const float *q, const float *k, const int64_t D) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
        for (int64_t d = 16; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), a);
        return _mm512_reduce_add_ps(a);
    }
#endif
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; d++) s += q[d] * k[d];
    return s;
}


static inline __attribute__((always_inline)) float dot_bf16(const float *q, const bf16 *k, const int64_t D) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), ld16_bf16(k));
        for (int64_t d = 16; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), ld16_bf16(k + d), a);
        return _mm512_reduce_add_ps(a);
    }
#endif
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; d++) s += q[d] * bf2f(k[d]);
    return s;
}

static inline __attribute__((always_inline)) void axpy_f32(float *acc, float p, const float *v, const int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) acc[d] += p * v[d];
}

static inline __attribute__((always_inline)) void axpy_bf16(float *acc, float p, const bf16 *v, const int64_t D) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 pv = _mm512_set1_ps(p);
        for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, ld16_bf16(v + d), _mm512_loadu_ps(acc + d)));
        return;
    }
#endif
#pragma omp simd
    for (int64_t d = 0; d < D; d++) acc[d] += p * bf2f(v[d]);
}

/* Each of G heads' scores p[g * T + t0 .. t1) -> exp(score - m[g]) (m[g] its max; all -inf: weights 0),
 * their sum -> l[g]. */
static inline void softmax_exp(float *p, int64_t T, int64_t G, int64_t t0, int64_t t1, const float *m, float *l) {
    for (int64_t g = 0; g < G; g++) {
        float mg = m[g] == -INFINITY ? 0.f : m[g], lg = 0.f, *pg = p + g * T;
        int64_t t = t0;
#if defined(__AVX512F__)
        __m512 mgv = _mm512_set1_ps(mg), lv = _mm512_setzero_ps();
        for (; t + 16 <= t1; t += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(pg + t), mgv));
            _mm512_storeu_ps(pg + t, e);
            lv = _mm512_add_ps(lv, e);
        }
        lg = _mm512_reduce_add_ps(lv);
#endif
        for (; t < t1; t++) {
            float e = exp_fast(pg[t] - mg);
            pg[t] = e;
            lg += e;
        }
        l[g] = lg;
    }
}

/* One split of one KV head: tokens [t0, t1) (in blocks of bs rows) for its G query heads qf (G, D).
 * Each K and V row is read once for the whole group. -> p[g * T + t] = exp(score - m[g]) (unnormalized),
 * m[g], l[g] (sum of p), acc[g * D ...] (sum of p v). */
static inline __attribute__((always_inline)) void attend_split(const float *qf, int64_t G, const void *k_pool,
                                                               const void *v_pool, const int32_t *blocks, int64_t t0,
                                                               int64_t t1, int64_t bs, const int64_t D,
                                                               const float *bias, float scale, float *p, int64_t T,
                                                               float *m, float *l, float *acc, int dt) {
    for (int64_t g = 0; g < G; g++) m[g] = -INFINITY, l[g] = 0.f;
    /* t0 is a multiple of bs (the caller splits on block boundaries): walk blocks, no divisions */
    for (int64_t t = t0, j = t0 / bs; t < t1; j++) {
        int64_t row = (int64_t)blocks[j] * bs, end = t + bs < t1 ? t + bs : t1;
        for (; t < end; t++, row++) {
            float bt = bias ? bias[row] : 0.f;
            for (int64_t g = 0; g < G; g++) {
                float s = dt ? dot_bf16(qf + g * D, (const bf16 *)k_pool + row * D, D)
                             : dot_f32(qf + g * D, (const float *)k_pool + row * D, D);
                s = s * scale + bt;
                p[g * T + t] = s;
                m[g] = s > m[g] ? s : m[g];
            }
        }
    }
    softmax_exp(p, T, G, t0, t1, m, l);
    for (int64_t d = 0; d < G * D; d++) acc[d] = 0.f;
    for (int64_t t = t0, j = t0 / bs; t < t1; j++) {
        int64_t row = (int64_t)blocks[j] * bs, end = t + bs < t1 ? t + bs : t1;
        for (; t < end; t++, row++) {
            for (int64_t g = 0; g < G; g++) {
                if (dt) axpy_bf16(acc + g * D, p[g * T + t], (const bf16 *)v_pool + row * D, D);
                else axpy_f32(acc + g * D, p[g * T + t], (const float *)v_pool + row * D, D);
            }
        }
    }
}

#if defined(__AVX512F__)
/* 16 vectors -> one: lane i = the sum of a[i]'s lanes (a transposing add tree: 15 adds and 30
 * shuffles for 16 tokens' scores, where 16 horizontal reductions take ~8 instructions each). */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of tokens 2i, 2i+1 */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: tokens 4i .. 4i+3, a lane's share each */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* 128-bit lanes summed in pairs */
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* q . k for one D = 64 key row, as a vector of partial sums (bf16 K by AVX512-BF16's pair-dot on the
 * bf16 query where the CPU has it: exact products, float32 sums). */
#if defined(__AVX512BF16__)
#define KV_QB_DECL __m512bh qb[4][2]
#else
#define KV_QB_DECL __m512 qb[1][1]
#endif
static inline __attribute__((always_inline)) __m512 dot64(const __m512 *qv, const void *qbp, const void *k_pool,
                                                         int64_t row, int dt) {
    if (dt) {
        const bf16 *kr = (const bf16 *)k_pool + row * 64;
#if defined(__AVX512BF16__)
        const __m512bh *qb = (const __m512bh *)qbp;
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr), k1 = (__m512bh)_mm512_loadu_si512(kr + 32);
        return _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qb[0], k0), qb[1], k1);
#else
        (void)qbp;
        __m512 a = _mm512_mul_ps(qv[0], ld16_bf16(kr));
        for (int c = 1; c < 4; c++) a = _mm512_fmadd_ps(qv[c], ld16_bf16(kr + c * 16), a);
        return a;
#endif
    }
    (void)qbp;
    const float *kr = (const float *)k_pool + row * 64;
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
    for (int c = 1; c < 4; c++) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + c * 16), a);
    return a;
}

/* attend_split for D = 64 and G <= 4 query heads, with the group's queries and outputs in registers.
 * Scores: 16 rows of a block at a time, reduced together by hsum16 (the last rows of a block one by
 * one). Values: each V row converted once for the G updates; a bf16 row as even and odd elements
 * (one shift, one mask per 32 values), so the accumulators hold the dims permuted until the end. */
static inline __attribute__((always_inline)) void attend_split64(const float *qf, const int64_t G,
                                                                 const void *k_pool, const void *v_pool,
                                                                 const int32_t *blocks, int64_t t0, int64_t t1,
                                                                 int64_t bs, const float *bias, float scale, float *p,
                                                                 int64_t T, float *m, float *l, float *acc, int dt) {
    __m512 qv[4][4];
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) qv[g][c] = _mm512_loadu_ps(qf + g * 64 + c * 16);
    KV_QB_DECL;
#if defined(__AVX512BF16__)
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 2; c++) qb[g][c] = _mm512_cvtne2ps_pbh(qv[g][2 * c + 1], qv[g][2 * c]);
#define KV_QB(g) ((const void *)qb[g])
#else
#define KV_QB(g) ((const void *)0)
#endif
    const __m512 sv = _mm512_set1_ps(scale);
    __m512 mv[4];
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int64_t g = 0; g < G; g++) mv[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t t = t0, j = t0 / bs; t < t1; j++) {
        int64_t row = (int64_t)blocks[j] * bs, end = t + bs < t1 ? t + bs : t1;
        for (; t + 16 <= end; t += 16, row += 16) {
            __m512 bt = bias ? _mm512_loadu_ps(bias + row) : _mm512_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                __m512 a[16];
                for (int i = 0; i < 16; i++) a[i] = dot64(qv[g], KV_QB(g), k_pool, row + i, dt);
                __m512 sc = _mm512_fmadd_ps(hsum16(a), sv, bt);
                _mm512_storeu_ps(p + g * T + t, sc);
                mv[g] = _mm512_max_ps(mv[g], sc);
            }
        }
        for (; t < end; t++, row++) {
            float bt = bias ? bias[row] : 0.f;
            for (int64_t g = 0; g < G; g++) {
                float sc = _mm512_reduce_add_ps(dot64(qv[g], KV_QB(g), k_pool, row, dt)) * scale + bt;
                p[g * T + t] = sc;
                mx[g] = sc > mx[g] ? sc : mx[g];
            }
        }
    }
#undef KV_QB
    for (int64_t g = 0; g < G; g++) {
        float mvg = _mm512_reduce_max_ps(mv[g]);
        m[g] = mvg > mx[g] ? mvg : mx[g];
    }
    softmax_exp(p, T, G, t0, t1, m, l);
    __m512 av[4][4];
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) av[g][c] = _mm512_setzero_ps();
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t t = t0, j = t0 / bs; t < t1; j++) {
        int64_t row = (int64_t)blocks[j] * bs, end = t + bs < t1 ? t + bs : t1;
        for (; t < end; t++, row++) {
            __m512 vc[4];
            if (dt) { /* vc: even dims 0-30, odd 1-31, even 32-62, odd 33-63 */
                const bf16 *vr = (const bf16 *)v_pool + row * 64;
                for (int c = 0; c < 2; c++) {
                    __m512i x = _mm512_loadu_si512(vr + c * 32);
                    vc[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
                    vc[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, hi16));
                }
            } else {
                const float *vr = (const float *)v_pool + row * 64;
                for (int c = 0; c < 4; c++) vc[c] = _mm512_loadu_ps(vr + c * 16);
            }
            for (int64_t g = 0; g < G; g++) {
                __m512 pb = _mm512_set1_ps(p[g * T + t]);
                for (int c = 0; c < 4; c++) av[g][c] = _mm512_fmadd_ps(pb, vc[c], av[g][c]);
            }
        }
    }
    if (dt) { /* even/odd back to dims in order */
        const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        for (int64_t g = 0; g < G; g++)
            for (int c = 0; c < 2; c++) {
                __m512 e = av[g][2 * c], o = av[g][2 * c + 1];
                av[g][2 * c] = _mm512_permutex2var_ps(e, lo, o);
                av[g][2 * c + 1] = _mm512_permutex2var_ps(e, hi, o);
            }
    }
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + c * 16, av[g][c]);
}
#undef KV_QB_DECL
#endif

/* c[t] += p[t] + p[T + t] + ... + p[(G - 1) T + t] for t < n, summed in that order into p's first row, a
 * head at a time: each loop runs along t, in vectors (a loop over the heads inside one over t did not
 * vectorize). Not inlined: inside the attention's parallel region it changed the code of the other loops
 * there, and `full` (which never sums) decoded ~5% slower. */
static __attribute__((noinline)) void group_sum_add(float *p, float *c, int64_t G, int64_t T, int64_t n) {
    for (int64_t g = 1; g < G; g++)
        for (int64_t t = 0; t < n; t++) p[t] += p[g * T + t];
    for (int64_t t = 0; t < n; t++) c[t] += p[t];
}

/* Decode attention over the paged store, one query token per slot (the layout of
 * kernels/paged_attention.py): q (B, Hq, D), its rows `q_stride` elements apart (each row's heads
 * contiguous); k_pool, v_pool (n_blocks, bs, D); table (B, Hkv, max_blocks) int32; lengths (B, Hkv) int32,
 * or NULL when every head holds `uniform` tokens; bias (n_blocks, bs) float32 or NULL; out (B, Hq, D).
 * Split-K as the Triton kernel: work item (slot, KV head, split) reads its share of the head's tokens
 * once for the G query heads of the group (so `splits` keeps both cores busy at batch 1) and leaves a
 * running max, sum and unnormalized output; a second pass merges a head's splits by log-sum-exp.
 * probs (B, Hq, T) float32 scratch, T = n_tab * bs (n_tab >= every head's block count); with `want_probs`
 * it holds each query head's probabilities (zeros past the head's length) before colsum (when not NULL)
 * gets their sums over each KV head's G query heads: written to colsum (B, Hkv, T) when cs_rows is NULL,
 * else added into a running buffer (n, Hkv, cs_cap) at row cs_rows[b] for slot b, tokens t < min(its
 * length, cs_cap) (exactly what adding the (B, Hkv, T) sums to those rows does: they are 0 past it; the
 * sums are taken in place in each group's first row of probs). part: (B * Hkv * splits * G * (D + 2))
 * float32 scratch. Float32 throughout; the output is rounded once. An empty head outputs zeros. */
void kv_decode_attention(const void *q, int64_t q_stride, const void *k_pool, const void *v_pool,
                         const int32_t *table, const int32_t *lengths, const float *bias, void *out, float *probs,
                         float *colsum, const int64_t *cs_rows, int64_t cs_cap, float *part, int64_t B, int64_t Hq,
                         int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, int64_t n_tab, int64_t uniform,
                         int64_t splits, int want_probs, float scale, int dt) {
    int64_t G = Hq / Hkv, T = n_tab * bs, P = G * (D + 2);
#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * Hkv * splits; item++) {
            int64_t bh = item / splits, sp = item % splits, b = bh / Hkv, hk = bh % Hkv;
            int64_t L = lengths ? lengths[bh] : uniform, chunk = ((L + splits - 1) / splits + bs - 1) / bs * bs;
            int64_t t0 = sp * chunk < L ? sp * chunk : L, t1 = t0 + chunk < L ? t0 + chunk : L;
            float qf[8 * 512], *pt = part + item * P; /* G <= 8, D <= 512: checked by the caller */
            for (int64_t g = 0; g < G; g++)
                load_row(qf + g * D, (const char *)q + (b * q_stride + (hk * G + g) * D) * (dt ? 2 : 4), D, dt);
            const int32_t *blocks = table + bh * max_blocks;
            float *p = probs + (b * Hq + hk * G) * T, *m = pt, *l = pt + G, *acc = pt + 2 * G;
#if defined(__AVX512F__)
#define KV_A64(g) attend_split64(qf, g, k_pool, v_pool, blocks, t0, t1, bs, bias, scale, p, T, m, l, acc, dt)
            if (D == 64 && G == 1) KV_A64(1);
            else if (D == 64 && G == 2) KV_A64(2);
            else if (D == 64 && G == 3) KV_A64(3);
            else if (D == 64 && G == 4) KV_A64(4);
            else
#undef KV_A64
#endif
            if (D == 64) attend_split(qf, G, k_pool, v_pool, blocks, t0, t1, bs, 64, bias, scale, p, T, m, l, acc, dt);
            else attend_split(qf, G, k_pool, v_pool, blocks, t0, t1, bs, D, bias, scale, p, T, m, l, acc, dt);
        }
#pragma omp for schedule(static)
        for (int64_t bq = 0; bq < B * Hq; bq++) {
            int64_t b = bq / Hq, hq = bq % Hq, hk = hq / G, g = hq % G, bh = b * Hkv + hk;
            int64_t L = lengths ? lengths[bh] : uniform, chunk = ((L + splits - 1) / splits + bs - 1) / bs * bs;
            float M = -INFINITY, Lsum = 0.f, w[64], o[512];
            for (int64_t sp = 0; sp < splits; sp++) {
                float ms = part[(bh * splits + sp) * P + g];
                M = ms > M ? ms : M;
            }
            for (int64_t sp = 0; sp < splits; sp++) {
                const float *pt = part + (bh * splits + sp) * P;
                w[sp] = pt[g] == -INFINITY ? 0.f : expf(pt[g] - M);
                Lsum += w[sp] * pt[G + g];
            }
            float inv = Lsum > 0.f ? 1.0f / Lsum : 0.f;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t sp = 0; sp < splits; sp++) {
                const float *acc = part + (bh * splits + sp) * P + 2 * G + g * D;
                for (int64_t d = 0; d < D; d++) o[d] += w[sp] * acc[d];
            }
            for (int64_t d = 0; d < D; d++) st(out, bq * D + d, o[d] * inv, dt);
            if (want_probs) {
                float *p = probs + bq * T;
                for (int64_t sp = 0; sp < splits; sp++) {
                    int64_t t0 = sp * chunk < L ? sp * chunk : L, t1 = t0 + chunk < L ? t0 + chunk : L;
                    float f = w[sp] * inv;
                    for (int64_t t = t0; t < t1; t++) p[t] *= f;
                }
                for (int64_t t = L; t < T; t++) p[t] = 0.f;
            }
        }
        if (want_probs && colsum) {
            /* each KV head's column sums over its G query heads (the implicit barrier above: every
               probability is final) */
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * Hkv; bh++) {
                int64_t b = bh / Hkv, hk = bh % Hkv;
                float *p = probs + (b * Hq + hk * G) * T;
                if (cs_rows) { /* the sum first, then one add: the order of summing into a (B, Hkv, T) first */
                    int64_t L = lengths ? lengths[bh] : uniform, n = L < cs_cap ? L : cs_cap;
                    float *c = colsum + (cs_rows[b] * Hkv + hk) * cs_cap;
                    group_sum_add(p, c, G, T, n);
                    continue;
                }
                float *c = colsum + bh * T;
                for (int64_t t = 0; t < T; t++) c[t] = p[t];
                for (int64_t g = 1; g < G; g++)
                    for (int64_t t = 0; t < T; t++) c[t] += p[g * T + t];
            }
        }
    }
}

