/* Each row of a's highest cosine similarity with a row of b, and which row: kernels/cpu.py `max_cosine`,
 * the reference being F.normalize(a) @ F.normalize(b).mT then .max(-1) in float32 (kvchat/methods/d2o.py
 * `max_similarity`, which D2O runs on every eviction: evicted keys against kept keys, per KV head).
 * torch materializes the (E, C) similarity matrix in float32 and spent ~1.2 ms an eviction on a Zen 4
 * (bfloat16 keys converted to float32, a float32 batched GEMM, then a max with indices that took a third
 * of it); at prefill, where a 4,096-token prompt evicts ~2,600 keys a head, ~30 ms a layer and slot.
 *
 * Fused: the dot products, the scaling by both rows' inverse norms and a running max and argmax per lane,
 * never writing the matrix. Norms as F.normalize takes them, 1 / max(||x||, 1e-12) in float32; the cosine
 * is dot(a, b) x inv_a x inv_b (the reference normalizes first: the same value to float32 rounding). A tie
 * goes to the first row of b, as torch's max does.
 *
 * Layout as cpu_prefill.c: per head, b is repacked into blocks of 16 rows whose lanes hold one row's value
 * (float32 path) or pair of values (bfloat16 on AVX512-BF16: one pair-dot adds a pair's exact products to
 * 16 rows' dots in float32), zeros past C; a micro-tile is 4 rows of a against 16 or 32 rows of b. */
#include <limits.h>
#include "cpu_common.h"

#define SR 4    /* rows of a a micro-tile */
#define SB 16   /* rows of b a packed block */

static inline float inv_norm(const void *x, int64_t D, int dt) {
    float s = 0.f;
    for (int64_t d = 0; d < D; d++) {
        float v = ld(x, d, dt);
        s += v * v;
    }
    float n = sqrtf(s);
    return 1.f / (n > 1e-12f ? n : 1e-12f);
}

/* The generic path (any D, float32 or bfloat16): bp (ceil(C / 16), D, 16) float32. */
static void pack_f32(const void *b, int64_t C, int64_t D, int dt, float *bp, float *inv, int64_t blk) {
    for (int64_t j = 0; j < SB; j++) {
        int64_t c = blk * SB + j;
        float *dst = bp + blk * D * SB + j;
        if (c < C) {
            const void *row = (const char *)b + c * D * (dt ? 2 : 4);
            for (int64_t d = 0; d < D; d++) dst[d * SB] = ld(row, d, dt);
            inv[c] = inv_norm(row, D, dt);
        } else {
            for (int64_t d = 0; d < D; d++) dst[d * SB] = 0.f;
            inv[c] = 0.f;
        }
    }
}

/* Rows e0 .. e0 + SR - 1 (those < E) of a against every row of b. */
static void tile_f32(const void *a, const float *bp, const float *inv, int64_t e0, int64_t E, int64_t C, int64_t D,
                     int dt, float *best, int64_t *idx) {
    float af[SR][512], mx[SR][SB], s[SR][SB], ia[SR];
    int64_t mi[SR][SB];
    for (int r = 0; r < SR; r++) {
        const void *row = (const char *)a + (e0 + r < E ? e0 + r : e0) * D * (dt ? 2 : 4);
        load_row(af[r], row, D, dt);
        ia[r] = inv_norm(row, D, dt);
        for (int j = 0; j < SB; j++) mx[r][j] = -INFINITY, mi[r][j] = 0;
    }
    for (int64_t blk = 0; blk * SB < C; blk++) {
        const float *bb = bp + blk * D * SB;
        for (int r = 0; r < SR; r++)
            for (int j = 0; j < SB; j++) s[r][j] = 0.f;
        for (int64_t d = 0; d < D; d++)
            for (int r = 0; r < SR; r++) {
                float x = af[r][d];
#pragma omp simd
                for (int j = 0; j < SB; j++) s[r][j] += x * bb[d * SB + j];
            }
        for (int r = 0; r < SR; r++)
            for (int j = 0; j < SB; j++) {
                int64_t c = blk * SB + j;
                float v = s[r][j] * inv[c];
                if (c < C && v > mx[r][j]) mx[r][j] = v, mi[r][j] = c;
            }
    }
    for (int r = 0; r < SR && e0 + r < E; r++) {
        float m = -INFINITY;
        int64_t at = INT64_MAX;
        for (int j = 0; j < SB; j++)
            if (mx[r][j] > m || (mx[r][j] == m && mi[r][j] < at)) m = mx[r][j], at = mi[r][j];
        best[e0 + r] = m * ia[r];
        idx[e0 + r] = at == INT64_MAX ? 0 : at;
    }
}

#if defined(__AVX512BF16__)
#define KV_SIMILAR_BF16 1
/* bp (ceil(C / 16), D / 2 pairs, 16) pairs of b's rows. */
static void pack_bf16(const bf16 *b, int64_t C, int64_t D, uint32_t *bp, float *inv, int64_t blk) {
    const int64_t P = D / 2;
    for (int64_t j = 0; j < SB; j++) {
        int64_t c = blk * SB + j;
        uint32_t *dst = bp + blk * P * SB + j;
        const uint32_t *row = (const uint32_t *)(b + (c < C ? c : 0) * D);
        for (int64_t p = 0; p < P; p++) dst[p * SB] = c < C ? row[p] : 0u;
        inv[c] = c < C ? inv_norm(b + c * D, D, 1) : 0.f;
    }
}

static void tile_bf16(const bf16 *a, const uint32_t *bp, const float *inv, int64_t e0, int64_t E, int64_t C,
                      int64_t D, float *best, int64_t *idx) {
    const int64_t P = D / 2;
    const uint32_t *ar[SR];
    __m512 mx[SR][2];
    __m512i mi[SR][2];
    float ia[SR];
    for (int r = 0; r < SR; r++) {
        ar[r] = (const uint32_t *)(a + (e0 + r < E ? e0 + r : e0) * D);
        ia[r] = inv_norm(ar[r], D, 1);
        mx[r][0] = mx[r][1] = _mm512_set1_ps(-INFINITY);
        mi[r][0] = mi[r][1] = _mm512_setzero_si512();
    }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t c0 = 0; c0 < C; c0 += 2 * SB) {
        const int two = c0 + SB < C; /* a second block of 16 rows holds some row < C */
        const uint32_t *b0 = bp + (c0 / SB) * P * SB, *b1 = b0 + P * SB;
        __m512 S[SR][2];
        for (int r = 0; r < SR; r++) S[r][0] = S[r][1] = _mm512_setzero_ps();
        if (two) {
            for (int64_t p = 0; p < P; p++) {
                __m512bh x0 = (__m512bh)_mm512_loadu_si512(b0 + p * SB), x1 = (__m512bh)_mm512_loadu_si512(b1 + p * SB);
                for (int r = 0; r < SR; r++) {
                    __m512bh y = (__m512bh)_mm512_set1_epi32((int)ar[r][p]);
                    S[r][0] = _mm512_dpbf16_ps(S[r][0], x0, y);
                    S[r][1] = _mm512_dpbf16_ps(S[r][1], x1, y);
                }
            }
        } else {
            for (int64_t p = 0; p < P; p++) {
                __m512bh x0 = (__m512bh)_mm512_loadu_si512(b0 + p * SB);
                for (int r = 0; r < SR; r++)
                    S[r][0] = _mm512_dpbf16_ps(S[r][0], x0, (__m512bh)_mm512_set1_epi32((int)ar[r][p]));
            }
        }
        for (int h = 0; h < 1 + two; h++) {
            const int64_t base = c0 + h * SB;
            __m512i key = _mm512_add_epi32(iota, _mm512_set1_epi32((int)base));
            __mmask16 live = _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32((int)C));
            __m512 vinv = _mm512_loadu_ps(inv + base); /* packed to a whole block: 0 past C */
            for (int r = 0; r < SR; r++) {
                __m512 v = _mm512_mul_ps(S[r][h], vinv);
                __mmask16 up = _mm512_mask_cmp_ps_mask(live, v, mx[r][h], _CMP_GT_OQ);
                mx[r][h] = _mm512_mask_mov_ps(mx[r][h], up, v);
                mi[r][h] = _mm512_mask_mov_epi32(mi[r][h], up, key);
            }
        }
    }
    for (int r = 0; r < SR && e0 + r < E; r++) {
        /* the two halves' lanes hold different rows: the larger value, the lower row on a tie */
        __mmask16 take1 = _mm512_cmp_ps_mask(mx[r][1], mx[r][0], _CMP_GT_OQ);
        __m512 m = _mm512_mask_mov_ps(mx[r][0], take1, mx[r][1]);
        __m512i at = _mm512_mask_mov_epi32(mi[r][0], take1, mi[r][1]);
        __mmask16 tie = _mm512_cmp_ps_mask(mx[r][1], mx[r][0], _CMP_EQ_OQ);
        at = _mm512_mask_min_epi32(at, tie, mi[r][0], mi[r][1]);
        float top = _mm512_reduce_max_ps(m);
        __mmask16 hit = _mm512_cmp_ps_mask(m, _mm512_set1_ps(top), _CMP_EQ_OQ);
        int first = _mm512_mask_reduce_min_epi32(hit, at);
        best[e0 + r] = top * ia[r];
        idx[e0 + r] = hit ? first : 0;
    }
}
#endif

/* The scratch `kv_max_cosine` needs, in bytes. */
int64_t kv_max_cosine_scratch(int64_t g, int64_t C, int64_t D) {
    const int64_t Cp = (C + 2 * SB - 1) / (2 * SB) * (2 * SB);
    return g * Cp * (D + 1) * 4 + 64;
}

/* a (g, E, D), b (g, C, D) contiguous, dtype dt (0 float32, 1 bfloat16), D <= 512; best (g, E) float32,
 * idx (g, E) int64; scratch: kv_max_cosine_scratch(g, C, D) bytes. */
void kv_max_cosine(const void *a, const void *b, int64_t g, int64_t E, int64_t C, int64_t D, float *best, int64_t *idx,
                   void *scratch, int dt) {
    const int64_t Cp = (C + 2 * SB - 1) / (2 * SB) * (2 * SB), nb = Cp / SB, es = dt ? 2 : 4;
    float *inv = (float *)scratch;
    void *bp = inv + g * Cp;
    const int64_t tiles = (E + SR - 1) / SR;
#ifdef KV_SIMILAR_BF16
    const int fast = dt == 1 && D % 2 == 0;
#else
    const int fast = 0;
#endif
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < g * nb; item++) {
            int64_t h = item / nb, blk = item % nb;
#ifdef KV_SIMILAR_BF16
            if (fast) {
                pack_bf16((const bf16 *)b + h * C * D, C, D, (uint32_t *)bp + h * Cp * D / 2, inv + h * Cp, blk);
                continue;
            }
#endif
            pack_f32((const char *)b + h * C * D * es, C, D, dt, (float *)bp + h * Cp * D, inv + h * Cp, blk);
        }
#pragma omp for schedule(dynamic, 2)
        for (int64_t item = 0; item < g * tiles; item++) {
            int64_t h = item / tiles, e0 = (item % tiles) * SR;
#ifdef KV_SIMILAR_BF16
            if (fast) {
                tile_bf16((const bf16 *)a + h * E * D, (const uint32_t *)bp + h * Cp * D / 2, inv + h * Cp, e0, E, C,
                          D, best + h * E, idx + h * E);
                continue;
            }
#endif
            tile_f32((const char *)a + h * E * D * es, (const float *)bp + h * Cp * D, inv + h * Cp, e0, E, C, D, dt,
                     best + h * E, idx + h * E);
        }
    }
}
