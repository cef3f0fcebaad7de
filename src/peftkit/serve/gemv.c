/* Small-batch products y = x W^T (+ b) for decoding on x86-64 CPUs with AVX2 and FMA (see gemv.py).

   At batch 1 a decode step reads every weight once, so its speed is the memory bandwidth: this kernel streams each
   weight row once for all rows of x (up to 4 at a time, from L1), converting bf16 weights to fp32 in registers, and
   accumulates in fp32. Every output element is computed by one thread, in one fixed order (two 8-lane accumulators
   over alternating blocks of 8, then the tail), whatever the number of rows or threads: a row's result does not
   depend on the batch it is in.

   x and y: fp32. w: [n, k] row-major, fp32 or bf16 (multiplied as its fp32 values). bias: fp32 or NULL. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* MB rows of x (stride k) against one fp32 weight row: out[m] = x[m] . w. */
static inline __attribute__((always_inline)) void dot_f32(const float *x, const float *w, int64_t k, float *out,
                                                          const int MB) {
    __m256 a0[4], a1[4];
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        _mm_prefetch((const char *)(w + j) + 2048, _MM_HINT_T0);
        __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);
        for (int m = 0; m < MB; m++) {
            a0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * k + j), w0, a0[m]);
            a1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * k + j + 8), w1, a1[m]);
        }
    }
    for (int m = 0; m < MB; m++) {
        float s = hsum(_mm256_add_ps(a0[m], a1[m]));
        for (int64_t t = j; t < k; t++) s += x[m * k + t] * w[t];
        out[m] = s;
    }
}

/* The same against one bf16 weight row, for x laid out by `split_pairs`: 16 weights load as one vector whose 32-bit
   lanes hold pairs; the even elements are the lanes shifted up 16 bits, the odd ones the lanes' upper halves. */
static inline __attribute__((always_inline)) void dot_bf16(const float *x, const uint16_t *w, int64_t k, float *out,
                                                           const int MB) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0[4], a1[4];
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        _mm_prefetch((const char *)(w + j) + 2048, _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + j));
        __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for (int m = 0; m < MB; m++) {
            a0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * k + j), even, a0[m]);
            a1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * k + j + 8), odd, a1[m]);
        }
    }
    for (int m = 0; m < MB; m++) {
        float s = hsum(_mm256_add_ps(a0[m], a1[m]));
        for (int64_t t = j; t < k; t++) s += x[m * k + t] * bf16_to_float(w[t]);
        out[m] = s;
    }
}

/* x with each whole block of 16 reordered to its 8 even then its 8 odd elements (for dot_bf16); the tail as it is. */
static void split_pairs(const float *x, float *to, int64_t m, int64_t k) {
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < k; j++) {
            int64_t at = j;
            if (j < k - k % 16) at = j - j % 16 + (j % 2) * 8 + (j % 16) / 2;
            to[i * k + at] = x[i * k + j];
        }
    }
}

/* One weight row against every row of x, 4 rows of x at a time. */
#define ROW_TIMES_X(NAME, DOT, WTYPE)                                                                              \
    static void NAME(const float *x, const WTYPE *w, int64_t m, int64_t k, float *out) {                          \
        for (int64_t i = 0; i < m; i += 4) {                                                                       \
            switch (m - i < 4 ? m - i : 4) {                                                                       \
                case 1: DOT(x + i * k, w, k, out + i, 1); break;                                                   \
                case 2: DOT(x + i * k, w, k, out + i, 2); break;                                                   \
                case 3: DOT(x + i * k, w, k, out + i, 3); break;                                                   \
                default: DOT(x + i * k, w, k, out + i, 4); break;                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

ROW_TIMES_X(row_f32, dot_f32, float)
ROW_TIMES_X(row_bf16, dot_bf16, uint16_t)

#define MAX_ROWS 64

/* Returns 0, or -1 when m is over MAX_ROWS or memory for x's reordered copy is short. */
int peftkit_gemv(const float *x, const void *w, int w_bf16, const float *bias, float *y, int64_t m, int64_t n,
                 int64_t k, int threads) {
    if (m > MAX_ROWS) return -1;
    const float *xs = x;
    float *copy = NULL;
    if (w_bf16) {
        copy = (float *)malloc((size_t)(m * k) * sizeof(float));
        if (!copy) return -1;
        split_pairs(x, copy, m, k);
        xs = copy;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < n; o++) {
        float out[MAX_ROWS];
        if (w_bf16)
            row_bf16(xs, (const uint16_t *)w + o * k, m, k, out);
        else
            row_f32(xs, (const float *)w + o * k, m, k, out);
        float b = bias ? bias[o] : 0.0f;
        for (int64_t i = 0; i < m; i++) y[i * n + o] = out[i] + b;
    }
    free(copy);
    return 0;
}
