/* kvchat's CPU decode kernels: the small ops of a decode step fused into single calls.
 *
 * A decode step at batch 1 spends as long outside its matmuls as in them: ~1,800 eager ATen ops,
 * each a few microseconds of dispatch for a few hundred bytes of work. These functions do a layer's
 * elementwise work (RMSNorm with its residual add, RoPE, SiLU-and-multiply) and its decode attention
 * in one call each, on raw pointers, with OpenMP over rows/heads (torch's own libgomp: the thread count
 * torch.set_num_threads gives is the one used here).
 *
 * dtype codes: 0 float32, 1 bfloat16. Every function computes in float32 and rounds where the torch
 * code it replaces rounds (see kernels/cpu.py for each function's reference), so float32 results agree
 * to summation order and bfloat16 results to one rounding.
 * Built by kernels/cpu.py with `cc -O3 -march=native -fopenmp`; nothing here depends on Python or torch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

static inline float bf2f(bf16 b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN kept quiet: what torch's float -> bfloat16 conversion does */
static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

/* x rounded to the model dtype and back: what storing an intermediate tensor does */
static inline float rnd(float x, int dt) { return dt ? bf2f(f2bf(x)) : x; }

/* exp(x) in a form the compiler vectorizes (glibc's expf is a scalar call): x = n ln2 + r, |r| <= ln2/2,
 * exp(r) by a degree-7 Taylor polynomial (relative error < 2e-7, about one ulp), times 2^n built in the
 * exponent bits. Below -87 (exp < 1.7e-38) it returns 0, as softmax wants; above 88, infinity. */
static inline float exp_fast(float x) {
    float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < -87.f ? 0.f : (x > 88.f ? INFINITY : p * scale);
}

static inline float ld(const void *p, int64_t i, int dt) {
    return dt ? bf2f(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float x, int dt) {
    if (dt) ((bf16 *)p)[i] = f2bf(x);
    else ((float *)p)[i] = x;
}

static inline void load_row(float *dst, const void *src, int64_t n, int dt) {
    if (dt) {
        const bf16 *s = (const bf16 *)src;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf2f(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

int kv_omp_threads(void) {
#ifdef _OPENMP
    extern int omp_get_max_threads(void);
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* HF's RMSNorm: h = float(x); h *= rsqrt(mean(h^2) + eps); out = w * h.to(dtype).
 * With `delta` (may be NULL): x += delta first, in place (rounded to dtype, as `x = x + delta` is).
 * x, delta, out (rows, dim) contiguous; w (dim,). */
void kv_add_rms_norm(void *x, const void *delta, const void *w, void *out, int64_t rows, int64_t dim, float eps,
                     int dt) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float ss = 0.f;
        int64_t o = r * dim;
        if (delta) {
            for (int64_t i = 0; i < dim; i++) st(x, o + i, ld(x, o + i, dt) + ld(delta, o + i, dt), dt);
        }
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) {
            float v = ld(x, o + i, dt);
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) st(out, o + i, ld(w, i, dt) * rnd(ld(x, o + i, dt) * inv, dt), dt);
    }
}

/* RoPE as kvchat's `rope_rolled`: out = x * cos + roll(x, D/2) * sin_s, each product rounded to dtype.
 * x: rows of `heads` heads of D values, row stride `x_stride` (elements); cos, sin_s (rows, D);
 * out (rows, heads, D) contiguous. */
void kv_rope(const void *x, int64_t x_stride, const void *cos, const void *sin_s, void *out, int64_t rows,
             int64_t heads, int64_t D, int dt) {
    int64_t half = D / 2;
#pragma omp parallel for collapse(2) schedule(static) if (rows * heads > 64)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t h = 0; h < heads; h++) {
            int64_t xi = r * x_stride + h * D, oi = (r * heads + h) * D;
            for (int64_t d = 0; d < D; d++) {
                int64_t src = d < half ? d + half : d - half;
                float a = rnd(ld(x, xi + d, dt) * ld(cos, r * D + d, dt), dt);
                float b = rnd(ld(x, xi + src, dt) * ld(sin_s, r * D + d, dt), dt);
                st(out, oi + d, a + b, dt);
            }
        }
    }
}

/* The MLP's activation: out = silu(gate) * up with gate, up the halves of gu (rows, 2 I); silu rounded
 * to dtype before the product, as `act(gate) * up` does. out (rows, I). */
void kv_silu_mul(const void *gu, void *out, int64_t rows, int64_t inter, int dt) {
#pragma omp parallel for schedule(static) if (rows * inter > 16384)
    for (int64_t r = 0; r < rows; r++) {
        if (dt) {
            const bf16 *g = (const bf16 *)gu + r * 2 * inter, *u = g + inter;
            bf16 *o = (bf16 *)out + r * inter;
#pragma omp simd
            for (int64_t i = 0; i < inter; i++) {
                float gi = bf2f(g[i]);
                o[i] = f2bf(bf2f(f2bf(gi / (1.0f + exp_fast(-gi)))) * bf2f(u[i]));
            }
        } else {
            const float *g = (const float *)gu + r * 2 * inter, *u = g + inter;
            float *o = (float *)out + r * inter;
#pragma omp simd
            for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + exp_fast(-g[i])) * u[i];
        }
    }
}

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

#if defined(__AVX512F__)
static inline __m512 ld16_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

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
    for (int64_t g = 0; g < G; g++) {
        float mg = m[g] == -INFINITY ? 0.f : m[g], lg = 0.f, *pg = p + g * T; /* all -inf: weights 0 */
#pragma omp simd reduction(+ : lg)
        for (int64_t t = t0; t < t1; t++) {
            float e = exp_fast(pg[t] - mg);
            pg[t] = e;
            lg += e;
        }
        l[g] = lg;
        for (int64_t d = 0; d < D; d++) acc[g * D + d] = 0.f;
    }
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
/* attend_split for D = 64 and G <= 4 query heads, with the group's queries and outputs in registers:
 * each K row is loaded once for the G dot products (bf16 K by AVX512-BF16's pair-dot on the bf16
 * queries, exact products, where the CPU has it), each V row converted once for the G updates. */
static inline __attribute__((always_inline)) void attend_split64(const float *qf, const int64_t G,
                                                                 const void *k_pool, const void *v_pool,
                                                                 const int32_t *blocks, int64_t t0, int64_t t1,
                                                                 int64_t bs, const float *bias, float scale, float *p,
                                                                 int64_t T, float *m, float *l, float *acc, int dt) {
    __m512 qv[4][4];
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) qv[g][c] = _mm512_loadu_ps(qf + g * 64 + c * 16);
#if defined(__AVX512BF16__)
    __m512bh qb[4][2];
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 2; c++) qb[g][c] = _mm512_cvtne2ps_pbh(qv[g][2 * c + 1], qv[g][2 * c]);
#endif
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int64_t t = t0, j = t0 / bs; t < t1; j++) {
        int64_t row = (int64_t)blocks[j] * bs, end = t + bs < t1 ? t + bs : t1;
        for (; t < end; t++, row++) {
            float bt = bias ? bias[row] : 0.f;
            __m512 a[4];
            if (dt) {
                const bf16 *kr = (const bf16 *)k_pool + row * 64;
#if defined(__AVX512BF16__)
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr), k1 = (__m512bh)_mm512_loadu_si512(kr + 32);
                for (int64_t g = 0; g < G; g++)
                    a[g] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qb[g][0], k0), qb[g][1], k1);
#else
                __m512 kc[4];
                for (int c = 0; c < 4; c++) kc[c] = ld16_bf16(kr + c * 16);
                for (int64_t g = 0; g < G; g++) {
                    a[g] = _mm512_mul_ps(qv[g][0], kc[0]);
                    for (int c = 1; c < 4; c++) a[g] = _mm512_fmadd_ps(qv[g][c], kc[c], a[g]);
                }
#endif
            } else {
                const float *kr = (const float *)k_pool + row * 64;
                __m512 kc[4];
                for (int c = 0; c < 4; c++) kc[c] = _mm512_loadu_ps(kr + c * 16);
                for (int64_t g = 0; g < G; g++) {
                    a[g] = _mm512_mul_ps(qv[g][0], kc[0]);
                    for (int c = 1; c < 4; c++) a[g] = _mm512_fmadd_ps(qv[g][c], kc[c], a[g]);
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float sc = _mm512_reduce_add_ps(a[g]) * scale + bt;
                p[g * T + t] = sc;
                mx[g] = sc > mx[g] ? sc : mx[g];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float mg = mx[g] == -INFINITY ? 0.f : mx[g], lg = 0.f, *pg = p + g * T; /* all -inf: weights 0 */
#pragma omp simd reduction(+ : lg)
        for (int64_t t = t0; t < t1; t++) {
            float e = exp_fast(pg[t] - mg);
            pg[t] = e;
            lg += e;
        }
        m[g] = mx[g], l[g] = lg;
    }
    __m512 av[4][4];
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) av[g][c] = _mm512_setzero_ps();
    for (int64_t t = t0, j = t0 / bs; t < t1; j++) {
        int64_t row = (int64_t)blocks[j] * bs, end = t + bs < t1 ? t + bs : t1;
        for (; t < end; t++, row++) {
            __m512 vc[4];
            if (dt) {
                const bf16 *vr = (const bf16 *)v_pool + row * 64;
                for (int c = 0; c < 4; c++) vc[c] = ld16_bf16(vr + c * 16);
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
    for (int64_t g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + c * 16, av[g][c]);
}
#endif

/* Decode attention over the paged store, one query token per slot (the layout of
 * kernels/paged_attention.py): q (B, Hq, D), its rows `q_stride` elements apart (each row's heads
 * contiguous); k_pool, v_pool (n_blocks, bs, D); table (B, Hkv, max_blocks) int32; lengths (B, Hkv) int32,
 * or NULL when every head holds `uniform` tokens; bias (n_blocks, bs) float32 or NULL; out (B, Hq, D).
 * Split-K as the Triton kernel: work item (slot, KV head, split) reads its share of the head's tokens
 * once for the G query heads of the group (so `splits` keeps both cores busy at batch 1) and leaves a
 * running max, sum and unnormalized output; a second pass merges a head's splits by log-sum-exp.
 * probs (B, Hq, T) float32 scratch, T = n_tab * bs (n_tab >= every head's block count); with `want_probs`
 * it ends as each query head's probabilities (zeros past the head's length), which the caller sums into
 * column sums. part: (B * Hkv * splits * G * (D + 2)) float32 scratch. Float32 throughout; the output is
 * rounded once. An empty head outputs zeros. */
void kv_decode_attention(const void *q, int64_t q_stride, const void *k_pool, const void *v_pool,
                         const int32_t *table, const int32_t *lengths, const float *bias, void *out, float *probs,
                         float *part, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                         int64_t n_tab, int64_t uniform, int64_t splits, int want_probs, float scale, int dt) {
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
    }
}

/* A decode step's append: row (b, h) of a value (B, H, row_bytes), at src + b * sb + h * sh (byte
 * strides; 0 broadcasts), is copied to row rows[b * H + h] of a pool of row_bytes rows. */
void kv_scatter_rows(char *dst, const char *src, int64_t sb, int64_t sh, int64_t B, int64_t H, const int64_t *rows,
                     int64_t row_bytes) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) memcpy(dst + rows[b * H + h] * row_bytes, src + b * sb + h * sh, (size_t)row_bytes);
}

/* ---- decode matmuls: y (M, N) = x (M, K) @ w (N, K)^T + bias, for the few rows of a decode step ------
 * A decode step reads every weight once for one to eight rows: the matmul is a memory stream. Each
 * thread takes a contiguous range of weight rows and walks it in address order (one linear stream, which
 * the hardware prefetcher follows; oneDNN's blocked GEMV reached ~15 GB/s here, this ~25), computing the
 * M (<= 16) dot products of a row while it is in registers. Float32 accumulation; bf16 products by AVX512-BF16's
 * dot instruction (exact products, float32 sums, as oneDNN's bf16 GEMM). */

int kv_fast_linear(int dt) {
#if defined(__AVX512BF16__)
    return 1;
#elif defined(__AVX512F__)
    return dt == 0;
#else
    (void)dt;
    return 0;
#endif
}

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void linear_rows_f32(const float *x, const float *w, const float *bias,
                                                                  float *y, const int64_t M, int64_t N, int64_t K,
                                                                  int64_t n0, int64_t n1) {
    __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1u);
    for (int64_t n = n0; n < n1; n++) {
        const float *wr = w + n * K;
        __m512 acc[16];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv = _mm512_loadu_ps(wr + k);
            for (int64_t m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), wv, acc[m]);
        }
        if (tail) {
            __m512 wv = _mm512_maskz_loadu_ps(tail, wr + k);
            for (int64_t m = 0; m < M; m++)
                acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + m * K + k), wv, acc[m]);
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]) + (bias ? bias[n] : 0.f);
    }
}
#endif

#if defined(__AVX512BF16__)
static inline __attribute__((always_inline)) void linear_rows_bf16(const bf16 *x, const bf16 *w, const bf16 *bias,
                                                                   bf16 *y, const int64_t M, int64_t N, int64_t K,
                                                                   int64_t n0, int64_t n1) {
    __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1ull);
    for (int64_t n = n0; n < n1; n++) {
        const bf16 *wr = w + n * K;
        __m512 acc[16];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
            for (int64_t m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
        }
        if (tail) {
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + k);
            for (int64_t m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k), wv);
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = f2bf(_mm512_reduce_add_ps(acc[m]) + (bias ? bf2f(bias[n]) : 0.f));
    }
}
#endif

/* M <= 16 rows (the caller checks, and checks kv_fast_linear(dt)); x, w, y contiguous. */
void kv_linear(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N, int64_t K, int dt) {
#pragma omp parallel
    {
#ifdef _OPENMP
        extern int omp_get_num_threads(void), omp_get_thread_num(void);
        int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
        int64_t nt = 1, t = 0;
#endif
        int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;
#define KV_ROWS(fn, T, m) fn((const T *)x, (const T *)w, (const T *)bias, (T *)y, m, N, K, n0, n1)
#if defined(__AVX512BF16__)
        if (dt == 1) {
            switch (M) {
            case 1: KV_ROWS(linear_rows_bf16, bf16, 1); break;
            case 2: KV_ROWS(linear_rows_bf16, bf16, 2); break;
            case 3: KV_ROWS(linear_rows_bf16, bf16, 3); break;
            case 4: KV_ROWS(linear_rows_bf16, bf16, 4); break;
            case 8: KV_ROWS(linear_rows_bf16, bf16, 8); break;
            default: KV_ROWS(linear_rows_bf16, bf16, M); break;
            }
        }
#endif
#if defined(__AVX512F__)
        if (dt == 0) {
            switch (M) {
            case 1: KV_ROWS(linear_rows_f32, float, 1); break;
            case 2: KV_ROWS(linear_rows_f32, float, 2); break;
            case 3: KV_ROWS(linear_rows_f32, float, 3); break;
            case 4: KV_ROWS(linear_rows_f32, float, 4); break;
            case 8: KV_ROWS(linear_rows_f32, float, 8); break;
            default: KV_ROWS(linear_rows_f32, float, M); break;
            }
        }
#endif
#undef KV_ROWS
        (void)n0, (void)n1;
    }
}
