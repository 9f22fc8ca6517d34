/* kvchat's CPU decode matmuls: y (M, N) = x (M, K) @ w (N, K)^T + bias for a decode step's few rows
 * (M <= 16), w row-major as the model has it.
 *
 * A decode step reads every weight once for one to sixteen rows: the matmul should be a memory stream.
 * Two paths, the same results but for float32 summation order:
 * - vectors (AVX-512 FMA for float32, AVX512-BF16's pair-dot for bfloat16): each thread walks a
 *   contiguous range of weight rows in address order, computing the M dot products of a row while it
 *   is in registers. At one row it streams; at four or more it is bound by the dot instruction's rate
 *   (measured on a 2-core Sapphire Rapids VM, the model's 30 layers and head: 15.8 ms at one row,
 *   28 ms at four and eight, 42 at sixteen).
 * - AMX tiles (bfloat16, where the CPU has AMX-BF16 and Linux grants the tile state): 16 weight rows x
 *   32 columns are a tile read in place (the weight is the A operand: no relayout), the step's rows,
 *   repacked once a call into AMX's pair layout, the B operand. One tile multiply does 16 x 32 x M
 *   products, so the matmul is a memory stream at every M: 12.1 / 12.9 / 12.9 / 16.4 ms at 1 / 4 / 8 /
 *   16 rows on that machine.
 * Built with the rest of the native ops (kernels/cpu.py); nothing here depends on Python or torch.
 */
#define _GNU_SOURCE /* syscall() for the AMX permission request (hidden by -std=c11 otherwise) */
#include "cpu_common.h"
#include <stdlib.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define KV_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define KV_LINEAR_AVX2 1
#endif

int kv_fast_linear(int dt) {
#if defined(__AVX512BF16__)
    return 1;
#elif defined(__AVX512F__)
    return dt == 0;
#elif defined(KV_LINEAR_AVX2)
    (void)dt;
    return 1; /* bfloat16 too: its rows widened to float32 in registers, half the bytes of float32 to read */
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

#ifdef KV_LINEAR_AVX2
/* AVX2 + FMA (CPUs without AVX-512: AMD Zen 2/3, Intel before Skylake-X and its client parts): 8 lanes, two
 * accumulators a row for up to 4 rows (the FMA's latency would bound one), one past that (16 registers). A
 * bfloat16 value widens to float32 exactly (a shift), so both dtypes compute in float32; bfloat16 reads half
 * the weight bytes and rounds the output as the AVX512-BF16 path does. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline __m256 ld8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8_bf16(const bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline float tof_f32(float v) { return v; }
static inline float tof_bf16(bf16 v) { return bf2f(v); }
static inline float out_f32(float v) { return v; }
static inline bf16 out_bf16(float v) { return f2bf(v); }

#define KV_AVX2_ROWS(NAME, T, SUF)                                                                                  \
    static inline __attribute__((always_inline)) void NAME(const T *x, const T *w, const T *bias, T *y,             \
                                                           const int64_t M, int64_t N, int64_t K, int64_t n0,     \
                                                           int64_t n1) {                                            \
        for (int64_t n = n0; n < n1; n++) {                                                                         \
            const T *wr = w + n * K;                                                                                \
            __m256 a0[16], a1[16];                                                                                  \
            for (int64_t m = 0; m < M; m++) a0[m] = a1[m] = _mm256_setzero_ps();                                    \
            int64_t k = 0;                                                                                          \
            if (M <= 4) {                                                                                           \
                for (; k + 16 <= K; k += 16) {                                                                      \
                    __m256 w0 = ld8_##SUF(wr + k), w1 = ld8_##SUF(wr + k + 8);                                      \
                    for (int64_t m = 0; m < M; m++) {                                                               \
                        a0[m] = _mm256_fmadd_ps(ld8_##SUF(x + m * K + k), w0, a0[m]);                               \
                        a1[m] = _mm256_fmadd_ps(ld8_##SUF(x + m * K + k + 8), w1, a1[m]);                           \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
            for (; k + 8 <= K; k += 8) {                                                                            \
                __m256 w0 = ld8_##SUF(wr + k);                                                                      \
                for (int64_t m = 0; m < M; m++) a0[m] = _mm256_fmadd_ps(ld8_##SUF(x + m * K + k), w0, a0[m]);       \
            }                                                                                                       \
            for (int64_t m = 0; m < M; m++) {                                                                       \
                float s = hsum8(_mm256_add_ps(a0[m], a1[m]));                                                       \
                for (int64_t j = k; j < K; j++) s += tof_##SUF(x[m * K + j]) * tof_##SUF(wr[j]);                    \
                y[m * N + n] = out_##SUF(s + (bias ? tof_##SUF(bias[n]) : 0.f));                                    \
            }                                                                                                       \
        }                                                                                                           \
    }
KV_AVX2_ROWS(linear_rows_f32, float, f32)
KV_AVX2_ROWS(linear_rows_bf16, bf16, bf16)
#undef KV_AVX2_ROWS
#endif

#ifdef _OPENMP
extern int omp_get_num_threads(void), omp_get_thread_num(void);
#else
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

/* The calling thread's share of y = x w^T + bias inside a parallel region (or all of it outside one). */
static void linear_share(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N, int64_t K,
                         int dt) {
    int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;
#define KV_ROWS(fn, T, m) fn((const T *)x, (const T *)w, (const T *)bias, (T *)y, m, N, K, n0, n1)
#if defined(__AVX512BF16__) || defined(KV_LINEAR_AVX2)
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
#if defined(__AVX512F__) || defined(KV_LINEAR_AVX2)
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

#ifdef KV_AMX
/* ---- AMX ------------------------------------------------------------------------------------------- */
static int amx_on = 0;

/* Turn the AMX path on (1) or off (0), or ask (-1); -> whether it is on. On needs the tile state, which
 * Linux grants a process on request: a kernel or hypervisor without it keeps the vector path. */
int kv_set_amx(int want) {
    static int granted = -1;
    if (want < 0) return amx_on;
    if (want && granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    amx_on = want && granted > 0;
    return amx_on;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed));

/* x (M, K) -> xv, AMX's pair layout for B: per 32 columns, 16 rows of M pairs (x[m][k + 2i], x[m][k + 2i + 1]). */
static void pack_pairs(const bf16 *x, bf16 *xv, int64_t M, int64_t K) {
    for (int64_t k = 0; k < K; k += 32)
        for (int64_t i = 0; i < 16; i++)
            for (int64_t m = 0; m < M; m++) {
                bf16 *o = xv + (k / 32) * 16 * M * 2 + (i * M + m) * 2;
                o[0] = x[m * K + k + 2 * i], o[1] = x[m * K + k + 2 * i + 1];
            }
}

/* C tile t (16 weight rows from n, M columns) -> y, bias added, rounded to bf16. */
static void store_block(int t, float *tmp, const bf16 *bias, bf16 *y, int64_t M, int64_t N, int64_t n) {
    if (t == 0) _tile_stored(0, tmp, M * 4);
    else _tile_stored(1, tmp, M * 4);
    for (int64_t i = 0; i < 16; i++)
        for (int64_t m = 0; m < M; m++) y[m * N + n + i] = f2bf(tmp[i * M + m] + (bias ? bf2f(bias[n + i]) : 0.f));
}

/* Weight rows [n0, n1) (n1 - n0 a multiple of 16) by tiles: two 16-row blocks at a time (tiles 0, 1
 * accumulate; 2, 3 hold their weights; 4 the step's rows). */
static void linear_tiles(const bf16 *xv, const bf16 *w, const bf16 *bias, bf16 *y, int64_t M, int64_t N, int64_t K,
                         int64_t n0, int64_t n1) {
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; t++) c.rows[t] = 16, c.colsb[t] = (uint16_t)(t == 2 || t == 3 ? 64 : M * 4);
    _tile_loadconfig(&c);
    float tmp[16 * 16];
    int64_t n = n0;
    for (; n + 32 <= n1; n += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t k = 0; k < K; k += 32) {
            _tile_loadd(4, xv + (k / 32) * 16 * M * 2, M * 4);
            _tile_loadd(2, w + n * K + k, K * 2);
            _tile_loadd(3, w + (n + 16) * K + k, K * 2);
            _tile_dpbf16ps(0, 2, 4);
            _tile_dpbf16ps(1, 3, 4);
        }
        store_block(0, tmp, bias, y, M, N, n);
        store_block(1, tmp, bias, y, M, N, n + 16);
    }
    if (n < n1) {
        _tile_zero(0);
        for (int64_t k = 0; k < K; k += 32) {
            _tile_loadd(4, xv + (k / 32) * 16 * M * 2, M * 4);
            _tile_loadd(2, w + n * K + k, K * 2);
            _tile_dpbf16ps(0, 2, 4);
        }
        store_block(0, tmp, bias, y, M, N, n);
    }
    _tile_release();
}

/* The AMX matmul, or 0 when it does not apply (off, float32, K not a multiple of 32, no memory). Each
 * thread takes whole 16-row blocks; the last also the N % 16 rows left, by vectors. */
static int linear_amx(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N, int64_t K,
                      int dt) {
    if (!amx_on || dt != 1 || K % 32 || M > 16 || N < 16) return 0;
    bf16 *xv = malloc((size_t)(M * K) * sizeof(bf16));
    if (!xv) return 0;
    pack_pairs((const bf16 *)x, xv, M, K);
    int64_t blocks = N / 16;
#pragma omp parallel
    {
        int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t n0 = 16 * (blocks * t / nt), n1 = 16 * (blocks * (t + 1) / nt);
        if (n1 > n0) linear_tiles(xv, (const bf16 *)w, (const bf16 *)bias, (bf16 *)y, M, N, K, n0, n1);
        if (t == nt - 1 && N % 16)
            linear_rows_bf16((const bf16 *)x, (const bf16 *)w, (const bf16 *)bias, (bf16 *)y, M, N, K, 16 * blocks, N);
    }
    free(xv);
    return 1;
}
#else
int kv_set_amx(int want) {
    (void)want;
    return 0;
}
#endif

/* M <= 16 rows (the caller checks, and checks kv_fast_linear(dt)); x, w, y contiguous. */
void kv_linear(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N, int64_t K, int dt) {
#ifdef KV_AMX
    if (linear_amx(x, w, bias, y, M, N, K, dt)) return;
#endif
#pragma omp parallel
    linear_share(x, w, bias, y, M, N, K, dt);
}
