/* kvchat's CPU causal attention for a prompt's first chunk (kernels/cpu.py `causal_attention`): bfloat16
 * q (T, Hq, 64), k and v (T, Hkv, 64), row strides given, query i of head h sees keys 0..i of KV head
 * h / (Hq / Hkv). The reference is torch's scaled_dot_product_attention(is_causal=True, enable_gqa=True),
 * which this replaces on CPUs with AVX512-BF16: torch's CPU flash attention ran at ~120 GFLOP/s on a
 * Zen 4, a third of what its bfloat16 GEMMs reach, and was half of a 2,048-token prefill.
 *
 * Flash attention as torch does it for bfloat16: scores q.k exact products summed in float32, scaled in
 * float32, an online softmax in float32 (running max and sum per row), the probabilities rounded to
 * bfloat16 for the product with V, accumulated in float32, divided by the sum and rounded once at the end.
 *
 * Layout. Per KV head, K is repacked into blocks of 16 keys whose 32-bit lanes hold one key's pair of
 * dims (2p, 2p+1), so one pair-dot (vdpbf16ps) with a query's broadcast pair adds that pair's products to
 * 16 keys' scores at once; V into key pairs whose lanes hold one dim of two consecutive keys, so a pair-dot
 * with a row's broadcast pair of probabilities adds 2 keys' weighted values to 16 dims. A micro-tile is 4
 * consecutive queries of one query head against 32 keys a step: scores in 8 registers, outputs in 16.
 * Keys past T are zero in the packed copies and masked, like every key after a query's own position. */
#include <stdlib.h>
#include "cpu_common.h"

#if defined(__AVX512BF16__)
#define KV_PREFILL_FAST 1
#endif

int kv_fast_prefill(void) {
#ifdef KV_PREFILL_FAST
    return 1;
#else
    return 0;
#endif
}

#ifdef KV_PREFILL_FAST
#define QR 4  /* queries a micro-tile */
#define KB 32 /* keys a step */

/* kp: (ceil(T / 16), 32 pairs, 16 keys) pairs of one head; vp: (ceil(T / 2), 64 dims) pairs. Both
 * sized for Tp (T rounded up to KB), zeros past T. */
static void pack_head(const bf16 *k, const bf16 *v, int64_t k_stride, int64_t v_stride, int64_t T, int64_t Tp,
                      uint32_t *kp, uint32_t *vp) {
    for (int64_t t = 0; t < Tp; t++) {
        const uint32_t *kr = (const uint32_t *)(k + (t < T ? t : 0) * k_stride);
        uint32_t *dst = kp + (t / 16) * 32 * 16 + t % 16;
        for (int p = 0; p < 32; p++) dst[p * 16] = t < T ? kr[p] : 0u;
    }
    for (int64_t t = 0; t < Tp; t += 2) {
        uint32_t *dst = vp + (t / 2) * 64;
        const bf16 *v0 = v + t * v_stride, *v1 = v + (t + 1 < T ? t + 1 : t) * v_stride;
        for (int d = 0; d < 64; d++) {
            uint32_t a = t < T ? v0[d] : 0u, b = t + 1 < T ? v1[d] : 0u; /* rows past T not read */
            dst[d] = a | (b << 16);
        }
    }
}

/* Queries i0 .. i0 + QR - 1 (those < T are written) of one query head. */
static inline void tile(const bf16 *q, int64_t q_stride, const uint32_t *kp, const uint32_t *vp, bf16 *out,
                        int64_t o_stride, int64_t i0, int64_t T, float scale) {
    __m512 o[QR][4], S[QR][2];
    float m[QR], l[QR];
    const uint32_t *qr[QR];
    for (int r = 0; r < QR; r++) {
        for (int c = 0; c < 4; c++) o[r][c] = _mm512_setzero_ps();
        m[r] = -INFINITY;
        l[r] = 0.f;
        qr[r] = (const uint32_t *)(q + (i0 + r < T ? i0 + r : T - 1) * q_stride);
    }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    const int64_t end = i0 + QR; /* keys 0 .. end - 1 can be seen by some row */
    uint32_t pb[QR][16] __attribute__((aligned(64)));
    for (int64_t j0 = 0; j0 < end; j0 += KB) {
        for (int r = 0; r < QR; r++) S[r][0] = S[r][1] = _mm512_setzero_ps();
        const uint32_t *k0 = kp + (j0 / 16) * 32 * 16, *k1 = k0 + 32 * 16;
        for (int p = 0; p < 32; p++) {
            __m512bh a0 = (__m512bh)_mm512_loadu_si512(k0 + p * 16), a1 = (__m512bh)_mm512_loadu_si512(k1 + p * 16);
            for (int r = 0; r < QR; r++) {
                __m512bh b = (__m512bh)_mm512_set1_epi32((int)qr[r][p]);
                S[r][0] = _mm512_dpbf16_ps(S[r][0], a0, b);
                S[r][1] = _mm512_dpbf16_ps(S[r][1], a1, b);
            }
        }
        const int masked = j0 + KB > i0; /* some key here is after some row's query */
        for (int r = 0; r < QR; r++) {
            for (int h = 0; h < 2; h++) {
                S[r][h] = _mm512_mul_ps(S[r][h], vscale);
                if (masked) { /* key j0 + 16h + lane visible iff <= i0 + r */
                    __m512i key = _mm512_add_epi32(iota, _mm512_set1_epi32((int)(j0 + 16 * h)));
                    __mmask16 vis = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32((int)(i0 + r)));
                    S[r][h] = _mm512_mask_mov_ps(ninf, vis, S[r][h]);
                }
            }
            float mx = _mm512_reduce_max_ps(_mm512_max_ps(S[r][0], S[r][1]));
            float mn = mx > m[r] ? mx : m[r]; /* finite: key 0 is in the first step for every row */
            float alpha = exp_fast(m[r] - mn);
            __m512 vm = _mm512_set1_ps(mn);
            __m512 p0 = exp16(_mm512_sub_ps(S[r][0], vm)), p1 = exp16(_mm512_sub_ps(S[r][1], vm));
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            m[r] = mn;
            if (alpha != 1.f) {
                __m512 va = _mm512_set1_ps(alpha);
                for (int c = 0; c < 4; c++) o[r][c] = _mm512_mul_ps(o[r][c], va);
            }
            _mm512_store_si512(pb[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0)); /* pair i: keys j0+2i, j0+2i+1 */
        }
        int64_t pairs = (end - j0 < KB ? end - j0 + 1 : KB) / 2; /* pairs holding a key some row sees */
        const uint32_t *vb = vp + (j0 / 2) * 64;
        for (int64_t i = 0; i < pairs; i++) {
            const uint32_t *vr = vb + i * 64;
            __m512bh v0 = (__m512bh)_mm512_loadu_si512(vr), v1 = (__m512bh)_mm512_loadu_si512(vr + 16),
                     v2 = (__m512bh)_mm512_loadu_si512(vr + 32), v3 = (__m512bh)_mm512_loadu_si512(vr + 48);
            for (int r = 0; r < QR; r++) {
                __m512bh b = (__m512bh)_mm512_set1_epi32((int)pb[r][i]);
                o[r][0] = _mm512_dpbf16_ps(o[r][0], v0, b);
                o[r][1] = _mm512_dpbf16_ps(o[r][1], v1, b);
                o[r][2] = _mm512_dpbf16_ps(o[r][2], v2, b);
                o[r][3] = _mm512_dpbf16_ps(o[r][3], v3, b);
            }
        }
    }
    for (int r = 0; r < QR && i0 + r < T; r++) {
        __m512 inv = _mm512_set1_ps(1.f / l[r]);
        bf16 *dst = out + (i0 + r) * o_stride;
        for (int c = 0; c < 4; c += 2) /* 32 values in order: c, c + 1 */
            _mm512_storeu_si512(dst + c * 16, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(o[r][c + 1], inv),
                                                                           _mm512_mul_ps(o[r][c], inv)));
    }
}
#endif

/* q (T, Hq, 64) with row stride q_stride (elements between positions), k and v (T, Hkv, 64) with row
 * strides k_stride and v_stride, out (T, Hq, 64) with row stride o_stride; all bfloat16, heads 64 values
 * apart. scratch: 2 * Hkv * Tp * 64 uint16 (Tp = T rounded up to 32). The caller checks kv_fast_prefill(). */
void kv_prefill_attention(const void *q, int64_t q_stride, const void *k, int64_t k_stride, const void *v,
                          int64_t v_stride, void *out, int64_t o_stride, void *scratch, int64_t T, int64_t Hq,
                          int64_t Hkv, float scale) {
#ifdef KV_PREFILL_FAST
    const int64_t G = Hq / Hkv, Tp = (T + KB - 1) / KB * KB, n_tiles = (T + QR - 1) / QR;
    uint32_t *kp = (uint32_t *)scratch, *vp = kp + Hkv * Tp * 32;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < Hkv; h++)
            pack_head((const bf16 *)k + h * 64, (const bf16 *)v + h * 64, k_stride, v_stride, T, Tp, kp + h * Tp * 32,
                      vp + h * Tp * 32);
        /* the longest tiles (last queries) first, so the threads finish together */
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < n_tiles * Hq; item++) {
            int64_t t = n_tiles - 1 - item / Hq, hq = item % Hq, hk = hq / G;
            tile((const bf16 *)q + hq * 64, q_stride, kp + hk * Tp * 32, vp + hk * Tp * 32, (bf16 *)out + hq * 64,
                 o_stride, t * QR, T, scale);
        }
    }
#else
    (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v, (void)v_stride, (void)out, (void)o_stride;
    (void)scratch, (void)T, (void)Hq, (void)Hkv, (void)scale;
#endif
}
