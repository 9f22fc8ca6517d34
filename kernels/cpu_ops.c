/* kvchat's CPU decode kernels: the small ops of a decode step fused into single calls.
 *
 * A decode step at batch 1 spends as long outside its matmuls as in them: ~1,800 eager ATen ops,
 * each a few microseconds of dispatch for a few hundred bytes of work. These functions do a layer's
 * elementwise work (RMSNorm with its residual add, RoPE, SiLU-and-multiply) and the append's row copies
 * in one call each (its matmuls: cpu_linear.c; its attention: cpu_attention.c), on raw
 * pointers, with OpenMP over rows (torch's own libgomp: the thread count torch.set_num_threads gives
 * is the one used here).
 *
 * dtype codes: 0 float32, 1 bfloat16. Every function computes in float32 and rounds where the torch
 * code it replaces rounds (see kernels/cpu.py for each function's reference), so float32 results agree
 * to summation order and bfloat16 results to one rounding.
 * Built by kernels/cpu.py with `cc -O3 -march=native -fopenmp`; nothing here depends on Python or torch.
 */
#include "cpu_common.h"

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
static void norm_rows(void *x, const void *delta, const void *w, void *out, int64_t r0, int64_t r1, int64_t dim,
                      float eps, int dt) {
    for (int64_t r = r0; r < r1; r++) {
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

void kv_add_rms_norm(void *x, const void *delta, const void *w, void *out, int64_t rows, int64_t dim, float eps,
                     int dt) {
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) norm_rows(x, delta, w, out, r, r + 1, dim, eps, dt);
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

/* s[i] = silu(g[i]) = g / (1 + exp(-g)), 16 lanes at a time where the CPU has AVX-512. */
static inline void silu_f32(const float *g, float *s, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        _mm512_storeu_ps(s + i, _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
    }
#endif
    for (; i < n; i++) s[i] = g[i] / (1.0f + exp_fast(-g[i]));
}

/* The MLP's activation: out = silu(gate) * up with gate, up the halves of gu (rows, 2 I); silu rounded
 * to dtype before the product, as `act(gate) * up` does. out (rows, I). */
static void silu_range(const void *gu, void *out, int64_t rows, int64_t inter, int64_t i0, int64_t i1, int dt) {
    float gf[256], sg[256];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = i0; i < i1; i += 256) {
            int64_t n = i1 - i < 256 ? i1 - i : 256;
            if (dt) {
                const bf16 *g = (const bf16 *)gu + r * 2 * inter + i, *u = g + inter;
                bf16 *o = (bf16 *)out + r * inter + i;
                for (int64_t k = 0; k < n; k++) gf[k] = bf2f(g[k]);
                silu_f32(gf, sg, n);
#pragma omp simd
                for (int64_t k = 0; k < n; k++) o[k] = f2bf(bf2f(f2bf(sg[k])) * bf2f(u[k]));
            } else {
                const float *g = (const float *)gu + r * 2 * inter + i, *u = g + inter;
                float *o = (float *)out + r * inter + i;
                silu_f32(g, sg, n);
#pragma omp simd
                for (int64_t k = 0; k < n; k++) o[k] = sg[k] * u[k];
            }
        }
    }
}

void kv_silu_mul(const void *gu, void *out, int64_t rows, int64_t inter, int dt) {
#pragma omp parallel for schedule(static) if (rows * inter > 16384)
    for (int64_t r = 0; r < rows; r++) silu_range((const char *)gu + r * 2 * inter * (dt ? 2 : 4),
                                                  (char *)out + r * inter * (dt ? 2 : 4), 1, inter, 0, inter, dt);
}

/* A decode step's append: row (b, h) of a value (B, H, row_bytes), at src + b * sb + h * sh (byte
 * strides; 0 broadcasts), is copied to row rows[b * H + h] of a pool of row_bytes rows. */
void kv_scatter_rows(char *dst, const char *src, int64_t sb, int64_t sh, int64_t B, int64_t H, const int64_t *rows,
                     int64_t row_bytes) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) memcpy(dst + rows[b * H + h] * row_bytes, src + b * sb + h * sh, (size_t)row_bytes);
}
