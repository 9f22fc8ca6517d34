/* Helpers shared by kernels/cpu_ops.c and kernels/cpu_attention.c: bfloat16 conversions that round as
 * torch does, a vectorizable exp, dtype-generic loads and stores (0 float32, 1 bfloat16). */
#ifndef KVCHAT_CPU_COMMON_H
#define KVCHAT_CPU_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
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

/* exp(x) without a libm call (glibc's expf is scalar; exp16 below is the 16-lane form): x = n ln2 + r, |r| <= ln2/2,
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

#if defined(__AVX512F__)
/* exp_fast on 16 lanes, the same steps (the compiler's own vectorization of exp_fast keeps 8 lanes and
 * costs several times more). */
static inline __m512 exp16(__m512 x) {
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f),
                                _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc));
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    __m512 y = _mm512_mul_ps(p, scale);
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ), _mm512_setzero_ps());
    return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.f), _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
}

static inline __m512 ld16_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

#endif
