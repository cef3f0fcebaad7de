/* peftkit's fused operators for training on x86-64 CPUs with AVX2 + FMA (fused_ops.py): norms and SwiGLU in fp32 and
 * bf16; attention, rotary embeddings and the fused LM head's softmax in fp32 (rotary in bf16 too).
 *
 * A Llama-style decoder layer's RMSNorms and its SwiGLU (silu(gate) * up) are, in torch, chains of 3-8 operators,
 * each a pass over memory with its own output tensor. Here each forward and each backward is one pass: for SmolLM2's
 * [656, 576] norm, fwd + bwd take 0.15-0.2 ms against 1.3-2.0 ms in torch; for its [656, 1536] SwiGLU 0.8 ms
 * against 3.4-3.8 (AMD EPYC, 2 cores; docs/performance.md, "Fused RMSNorm and SwiGLU"). In bf16 (a bf16 base on a
 * CPU with native bf16) they also save the casts to fp32 and back around each norm: a LoRA step 0.89x the time.
 *
 * Threads come from the caller's count, over rows (norms) or blocks of 4096 elements (SwiGLU). Every output element
 * is computed by one thread in a fixed order, so results do not depend on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 4096

static inline float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

/* exp of 8 floats: Cephes' expf (range reduction by ln 2, degree-6 polynomial), within ~2 ulp of expf on the range
 * where expf is finite and normal; inputs are clamped to [-87.3, 88.7], a NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.7f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

static inline __m256 sigmoid8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* out = silu(gate) * up = gate * sigmoid(gate) * up, over n elements */
void peftkit_swiglu_forward(const float *gate, const float *up, float *out, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n, i = start;
        for (; i + 8 <= end; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), _mm256_loadu_ps(up + i)));
        }
        for (; i < end; i++) out[i] = gate[i] * sigmoid1(gate[i]) * up[i];
    }
}

/* d_up = grad * silu(gate); d_gate = grad * up * silu'(gate), silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g) */
void peftkit_swiglu_backward(const float *grad, const float *gate, const float *up, float *d_gate, float *d_up,
                             int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n, i = start;
        __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= end; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i), s = sigmoid8(g);
            __m256 ds = _mm256_mul_ps(_mm256_loadu_ps(grad + i), s);
            _mm256_storeu_ps(d_up + i, _mm256_mul_ps(ds, g));
            __m256 slope = _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one);
            _mm256_storeu_ps(d_gate + i, _mm256_mul_ps(_mm256_mul_ps(ds, _mm256_loadu_ps(up + i)), slope));
        }
        for (; i < end; i++) {
            float g = gate[i], s = sigmoid1(g), ds = grad[i] * s;
            d_up[i] = ds * g;
            d_gate[i] = ds * up[i] * (1.0f + g * (1.0f - s));
        }
    }
}

/* Per row of `width`: rstd = 1 / sqrt(mean(x^2) + eps), y = w * (x * rstd); rstd is kept for the backward. */
void peftkit_rms_norm_forward(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t width,
                              float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *yr = y + r * width, squares = 0.0f;
        #pragma omp simd reduction(+:squares)
        for (int64_t i = 0; i < width; i++) squares += xr[i] * xr[i];
        float k = 1.0f / sqrtf(squares / (float)width + eps);
        rstd[r] = k;
        #pragma omp simd
        for (int64_t i = 0; i < width; i++) yr[i] = w[i] * (xr[i] * k);
    }
}

/* dx = rstd * (gw - xhat * mean(gw * xhat)), gw = grad * w, xhat = x * rstd */
void peftkit_rms_norm_backward(const float *grad, const float *x, const float *w, const float *rstd, float *dx,
                               int64_t rows, int64_t width, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = grad + r * width, *xr = x + r * width;
        float *dr = dx + r * width, k = rstd[r], dot = 0.0f;
        #pragma omp simd reduction(+:dot)
        for (int64_t i = 0; i < width; i++) dot += gr[i] * w[i] * xr[i];
        float c = dot * k * k / (float)width;
        #pragma omp simd
        for (int64_t i = 0; i < width; i++) dr[i] = k * (gr[i] * w[i] - xr[i] * c);
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * The same norms and SwiGLU for bf16 tensors (training on a bf16 base): bf16 in and out, fp32 arithmetic, each result
 * rounded to bf16 where torch's bf16 operators round it (the SwiGLU's silu and its product; the norm's x * rstd and
 * its product with the weight), so a step computes torch's numbers up to the order of the norm's sums. AVX2 only:
 * bf16 values are the high halves of fp32 ones, so no bf16 instructions are needed.
 */

/* 8 bf16 values as fp32 */
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 fp32 values rounded to the nearest bf16 (ties to even), as fp32; a NaN stays a (quiet) NaN, as in torch */
static inline __m256 round8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan);
}

/* 8 fp32 values that are bf16 values already (round8_bf16's) stored as bf16 */
static inline void store8_bf16(uint16_t *p, __m256 v) {
    __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}

static inline float bf16_value(uint16_t h) {
    union { uint32_t u; float f; } c = {(uint32_t)h << 16};
    return c.f;
}

static inline float round_bf16(float f) {
    union { float f; uint32_t u; } c = {f};
    if (f != f) { c.u = 0x7fc00000u; return c.f; }
    c.u = (c.u + 0x7fffu + ((c.u >> 16) & 1u)) & 0xffff0000u;
    return c.f;
}

static inline uint16_t to_bf16(float f) {  /* f a bf16 value already */
    union { float f; uint32_t u; } c = {f};
    return (uint16_t)(c.u >> 16);
}

/* out = R(R(silu(gate)) * up) */
void peftkit_swiglu_forward_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n, i = start;
        for (; i + 8 <= end; i += 8) {
            __m256 g = load8_bf16(gate + i), silu = round8_bf16(_mm256_mul_ps(g, sigmoid8(g)));
            store8_bf16(out + i, round8_bf16(_mm256_mul_ps(silu, load8_bf16(up + i))));
        }
        for (; i < end; i++) {
            float g = bf16_value(gate[i]);
            out[i] = to_bf16(round_bf16(round_bf16(g * sigmoid1(g)) * bf16_value(up[i])));
        }
    }
}

/* d_up = R(grad * R(silu(gate))); d_gate = R(R(grad * up) * silu'(gate)), as torch's mul and silu backward */
void peftkit_swiglu_backward_bf16(const uint16_t *grad, const uint16_t *gate, const uint16_t *up, uint16_t *d_gate,
                                  uint16_t *d_up, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t end = start + BLOCK < n ? start + BLOCK : n, i = start;
        __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= end; i += 8) {
            __m256 g = load8_bf16(gate + i), s = sigmoid8(g), dy = load8_bf16(grad + i);
            store8_bf16(d_up + i, round8_bf16(_mm256_mul_ps(dy, round8_bf16(_mm256_mul_ps(g, s)))));
            __m256 d_silu = round8_bf16(_mm256_mul_ps(dy, load8_bf16(up + i)));
            __m256 slope = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
            store8_bf16(d_gate + i, round8_bf16(_mm256_mul_ps(d_silu, slope)));
        }
        for (; i < end; i++) {
            float g = bf16_value(gate[i]), s = sigmoid1(g), dy = bf16_value(grad[i]);
            d_up[i] = to_bf16(round_bf16(dy * round_bf16(g * s)));
            d_gate[i] = to_bf16(round_bf16(round_bf16(dy * bf16_value(up[i])) * (s * (1.0f + g * (1.0f - s)))));
        }
    }
}

/* y = R(w * R(x * rstd)), rstd = 1 / sqrt(mean(x^2) + eps) in fp32 (kept for the backward); w bf16 */
void peftkit_rms_norm_forward_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, float *rstd, int64_t rows,
                                   int64_t width, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * width;
        uint16_t *yr = y + r * width;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            __m256 v = load8_bf16(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float lanes[8], squares = 0.0f;
        _mm256_storeu_ps(lanes, acc);
        for (int j = 0; j < 8; j++) squares += lanes[j];
        for (int64_t t = i; t < width; t++) squares += bf16_value(xr[t]) * bf16_value(xr[t]);
        float k = 1.0f / sqrtf(squares / (float)width + eps);
        rstd[r] = k;
        __m256 kk = _mm256_set1_ps(k);
        for (i = 0; i + 8 <= width; i += 8) {
            __m256 h = round8_bf16(_mm256_mul_ps(load8_bf16(xr + i), kk));
            store8_bf16(yr + i, round8_bf16(_mm256_mul_ps(load8_bf16(w + i), h)));
        }
        for (; i < width; i++) yr[i] = to_bf16(round_bf16(bf16_value(w[i]) * round_bf16(bf16_value(xr[i]) * k)));
    }
}

/* dx = R(rstd * (gw - x * rstd^2 * mean(gw * x))), gw = R(grad * w): torch's backward through the fp32 norm */
void peftkit_rms_norm_backward_bf16(const uint16_t *grad, const uint16_t *x, const uint16_t *w, const float *rstd,
                                    uint16_t *dx, int64_t rows, int64_t width, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gr = grad + r * width, *xr = x + r * width;
        uint16_t *dr = dx + r * width;
        float k = rstd[r];
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            __m256 gw = round8_bf16(_mm256_mul_ps(load8_bf16(gr + i), load8_bf16(w + i)));
            acc = _mm256_fmadd_ps(gw, load8_bf16(xr + i), acc);
        }
        float lanes[8], dot = 0.0f;
        _mm256_storeu_ps(lanes, acc);
        for (int j = 0; j < 8; j++) dot += lanes[j];
        for (int64_t t = i; t < width; t++)
            dot += round_bf16(bf16_value(gr[t]) * bf16_value(w[t])) * bf16_value(xr[t]);
        float c = dot * k * k / (float)width;
        __m256 kk = _mm256_set1_ps(k), cc = _mm256_set1_ps(c);
        for (i = 0; i + 8 <= width; i += 8) {
            __m256 gw = round8_bf16(_mm256_mul_ps(load8_bf16(gr + i), load8_bf16(w + i)));
            __m256 d = _mm256_mul_ps(kk, _mm256_fnmadd_ps(load8_bf16(xr + i), cc, gw));
            store8_bf16(dr + i, round8_bf16(d));
        }
        for (; i < width; i++) {
            float gw = round_bf16(bf16_value(gr[i]) * bf16_value(w[i]));
            dr[i] = to_bf16(round_bf16(k * (gw - bf16_value(xr[i]) * c)));
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Rotary position embedding (transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin), forward and
 * backward, fp32 and bf16, for q or k laid out [rows, heads, dim] with cos and sin [cos_rows, dim] (rows: batch x
 * tokens, a decoder layer's q and k as its projections write them; row r takes cos row r % cos_rows, so positions
 * shared by a padded batch's rows are given once). In torch it is ~10 operators each way (slices, neg, cat,
 * three products, sums), each a pass over memory with its own output: q and k of a 1,000-token SmolLM2 row took
 * 3.1-3.3 ms a layer forward and backward through autograd, 0.85-1.2 ms here (AMD EPYC, 2 cores; docs/performance.md,
 * "Rotary embedding in one pass").
 *
 * With half = dim / 2, lo = x[i], hi = x[i + half]:
 *   forward:  out[i] = lo * cos[i] - hi * sin[i],            out[i + half] = hi * cos[i + half] + lo * sin[i + half]
 *   backward: dx[i]  = lo * cos[i] + hi * sin[i + half],     dx[i + half]  = hi * cos[i + half] - lo * sin[i]
 * (lo, hi the gradient's halves in the backward). Each product and each sum is rounded as torch rounds it (to fp32; to
 * bf16 for bf16 tensors) and never contracted into a fused multiply-add, so both directions give torch's numbers to
 * the bit. half must be a multiple of 8.
 */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* 8 values at element i of an fp32 (bf16 = 0) or bf16 array, as fp32; and back, rounded to bf16 first for bf16 */
static inline __m256 load8_any(const void *p, int64_t i, int bf16) {
    return bf16 ? load8_bf16((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}
static inline __m256 round8_any(__m256 v, int bf16) { return bf16 ? round8_bf16(v) : v; }
static inline void store8_any(void *p, int64_t i, __m256 v, int bf16) {
    if (bf16) store8_bf16((uint16_t *)p + i, round8_bf16(v));
    else _mm256_storeu_ps((float *)p + i, v);
}

/* Inlined into each of the two functions below, so that the dtype branches fold away at compile time */
static inline __attribute__((always_inline)) void rope(const void *x, const void *cos, const void *sin, void *out,
                                                       int64_t rows, int64_t cos_rows, int64_t heads, int64_t dim,
                                                       int backward, int bf16, int threads) {
    int64_t half = dim / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = r % cos_rows * dim;  /* element offsets of this row's cos and sin */
        for (int64_t h = 0; h < heads; h++) {
            int64_t o = (r * heads + h) * dim;
            for (int64_t i = 0; i < half; i += 8) {
                __m256 lo = load8_any(x, o + i, bf16), hi = load8_any(x, o + i + half, bf16);
                __m256 s_lo = load8_any(sin, c + (backward ? i + half : i), bf16);
                __m256 s_hi = load8_any(sin, c + (backward ? i : i + half), bf16);
                __m256 a = round8_any(_mm256_mul_ps(lo, load8_any(cos, c + i, bf16)), bf16);
                __m256 p = round8_any(_mm256_mul_ps(hi, s_lo), bf16);
                __m256 b = round8_any(_mm256_mul_ps(hi, load8_any(cos, c + i + half, bf16)), bf16);
                __m256 q = round8_any(_mm256_mul_ps(lo, s_hi), bf16);
                store8_any(out, o + i, backward ? _mm256_add_ps(a, p) : _mm256_sub_ps(a, p), bf16);
                store8_any(out, o + i + half, backward ? _mm256_sub_ps(b, q) : _mm256_add_ps(b, q), bf16);
            }
        }
    }
}

void peftkit_rope(const float *x, const float *cos, const float *sin, float *out, int64_t rows, int64_t cos_rows,
                  int64_t heads, int64_t dim, int backward, int threads) {
    rope(x, cos, sin, out, rows, cos_rows, heads, dim, backward, 0, threads);
}

void peftkit_rope_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, int64_t rows,
                       int64_t cos_rows, int64_t heads, int64_t dim, int backward, int threads) {
    rope(x, cos, sin, out, rows, cos_rows, heads, dim, backward, 1, threads);
}

#pragma GCC pop_options

/* ---------------------------------------------------------------------------------------------------------------
 * Causal attention of a padding-free row's examples (fused_ops.attention), forward and backward, fp32.
 *
 * Why: torch's CPU flash attention runs short examples in small blocks; in a LoRA step of SmolLM2 in fp32 it was
 * ~11% of the time (docs/performance.md, "Attention of padding-free examples in one kernel call"). Here each
 * (example, head) is done whole: its score matrix (at most MAX_LEN^2 floats) stays in the thread's scratch, the
 * causal upper triangle is skipped, and all examples and heads of a layer are one parallel loop.
 *
 * Layouts: q [tokens, heads, dim] and k, v [tokens, kv_heads, dim] at any token/head strides, dim contiguous; out,
 * grad_out and dq [tokens, heads, dim] contiguous; dk, dv [tokens, kv_heads, dim] contiguous, zeroed by the caller;
 * lse [heads, tokens] (log-sum-exp of each row's scaled scores, kept for the backward). Query head h reads key/value
 * head h / (heads / kv_heads). dim must be a multiple of 8. Each output element is written by one task in a fixed
 * order: results do not depend on the thread count.
 */
#include <stdlib.h>
#include <string.h>

static inline int64_t round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* C[r, 0:16] (+)= sum over k in [k0, k1) of A[r, k] * B[k, 0:16], for 4 rows r; A[r, k] is at A + r * ar + k * ak
 * (ak = 1 reads A by rows, ar = 1 reads it transposed) */
static inline void mul_4x16(const float *A, int64_t ar, int64_t ak, const float *B, int64_t ldb, float *C,
                            int64_t ldc, int64_t k0, int64_t k1, int accumulate) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31;
    if (accumulate) {
        c00 = _mm256_loadu_ps(C); c01 = _mm256_loadu_ps(C + 8);
        c10 = _mm256_loadu_ps(C + ldc); c11 = _mm256_loadu_ps(C + ldc + 8);
        c20 = _mm256_loadu_ps(C + 2 * ldc); c21 = _mm256_loadu_ps(C + 2 * ldc + 8);
        c30 = _mm256_loadu_ps(C + 3 * ldc); c31 = _mm256_loadu_ps(C + 3 * ldc + 8);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = _mm256_setzero_ps();
    }
    for (int64_t k = k0; k < k1; k++) {
        const float *b = B + k * ldb, *a = A + k * ak;
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), x;
        x = _mm256_broadcast_ss(a); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + ar); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + 2 * ar); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + 3 * ar); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    }
    _mm256_storeu_ps(C, c00); _mm256_storeu_ps(C + 8, c01);
    _mm256_storeu_ps(C + ldc, c10); _mm256_storeu_ps(C + ldc + 8, c11);
    _mm256_storeu_ps(C + 2 * ldc, c20); _mm256_storeu_ps(C + 2 * ldc + 8, c21);
    _mm256_storeu_ps(C + 3 * ldc, c30); _mm256_storeu_ps(C + 3 * ldc + 8, c31);
}

/* mul_4x16 over 24 columns: 12 accumulators cover the two FMA units' 4-cycle latency with room to spare (mul_4x16's
 * 8 are the bare minimum); with it the attention's forward and backward took 0.89x the time (AVX2 EPYC, 2026-12-04).
 * Written out register by register like mul_4x16, not as one kernel over an accumulator array: GCC kept that array
 * in memory, and the attention ran 1.66x slower. */
static inline void mul_4x24(const float *A, int64_t ar, int64_t ak, const float *B, int64_t ldb, float *C,
                            int64_t ldc, int64_t k0, int64_t k1, int accumulate) {
    __m256 c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;
    if (accumulate) {
        c00 = _mm256_loadu_ps(C); c01 = _mm256_loadu_ps(C + 8); c02 = _mm256_loadu_ps(C + 16);
        c10 = _mm256_loadu_ps(C + ldc); c11 = _mm256_loadu_ps(C + ldc + 8); c12 = _mm256_loadu_ps(C + ldc + 16);
        c20 = _mm256_loadu_ps(C + 2 * ldc); c21 = _mm256_loadu_ps(C + 2 * ldc + 8);
        c22 = _mm256_loadu_ps(C + 2 * ldc + 16);
        c30 = _mm256_loadu_ps(C + 3 * ldc); c31 = _mm256_loadu_ps(C + 3 * ldc + 8);
        c32 = _mm256_loadu_ps(C + 3 * ldc + 16);
    } else {
        c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = _mm256_setzero_ps();
    }
    for (int64_t k = k0; k < k1; k++) {
        const float *b = B + k * ldb, *a = A + k * ak;
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), b2 = _mm256_loadu_ps(b + 16), x;
        x = _mm256_broadcast_ss(a);
        c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01); c02 = _mm256_fmadd_ps(x, b2, c02);
        x = _mm256_broadcast_ss(a + ar);
        c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11); c12 = _mm256_fmadd_ps(x, b2, c12);
        x = _mm256_broadcast_ss(a + 2 * ar);
        c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21); c22 = _mm256_fmadd_ps(x, b2, c22);
        x = _mm256_broadcast_ss(a + 3 * ar);
        c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31); c32 = _mm256_fmadd_ps(x, b2, c32);
    }
    _mm256_storeu_ps(C, c00); _mm256_storeu_ps(C + 8, c01); _mm256_storeu_ps(C + 16, c02);
    _mm256_storeu_ps(C + ldc, c10); _mm256_storeu_ps(C + ldc + 8, c11); _mm256_storeu_ps(C + ldc + 16, c12);
    _mm256_storeu_ps(C + 2 * ldc, c20); _mm256_storeu_ps(C + 2 * ldc + 8, c21); _mm256_storeu_ps(C + 2 * ldc + 16, c22);
    _mm256_storeu_ps(C + 3 * ldc, c30); _mm256_storeu_ps(C + 3 * ldc + 8, c31); _mm256_storeu_ps(C + 3 * ldc + 16, c32);
}

/* 4-row blocks of `cols` (a multiple of 16) columns, 24 at a time, then 16 (so no 8-column block is left over) */
static inline void mul_4xcols(const float *A, int64_t ar, int64_t ak, const float *B, int64_t ldb, float *C,
                              int64_t ldc, int64_t cols, int64_t k0, int64_t k1, int accumulate) {
    int64_t wide = cols / 24, c = 0;
    if (cols % 24 == 8 && wide > 0) wide--;  /* 24 + 8 as 16 + 16 */
    for (int64_t w = 0; w < wide; w++, c += 24) mul_4x24(A, ar, ak, B + c, ldb, C + c, ldc, k0, k1, accumulate);
    for (; c < cols; c += 16) mul_4x16(A, ar, ak, B + c, ldb, C + c, ldc, k0, k1, accumulate);
}

/* sum of a[d] * b[d] over d < dim (a multiple of 8), in eight lanes */
static inline float dot8(const float *a, const float *b, int64_t dim) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, acc);
    for (int t = 0; t < 8; t++) total += lanes[t];
    return total;
}

/* the same for `rows` (1-4) rows over 8 columns: row tails, and a head dim that is a multiple of 8 but not of 16 */
static inline void mul_rx8(int64_t rows, const float *A, int64_t ar, int64_t ak, const float *B, int64_t ldb,
                           float *C, int64_t ldc, int64_t k0, int64_t k1, int accumulate) {
    for (int64_t r = 0; r < rows; r++) {
        __m256 c0 = accumulate ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k++)
            c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * ar + k * ak), _mm256_loadu_ps(B + k * ldb), c0);
        _mm256_storeu_ps(C + r * ldc, c0);
    }
}

/* C[0:rows, 0:cols] (+)= A[0:rows, k] B[k, 0:cols], A[r, k] at A + r * ar + k * ak, over k in [lo(r), hi(r)): row
 * block r0..r0+3 takes k from `from_row` ? r0 : 0 up to `to_row` ? min(r0 + 4, k_end) : k_end (the causal triangle's
 * extent; entries of A outside a row's own range must be zero). cols is a multiple of 8. */
static void product(int64_t rows, const float *A, int64_t ar, int64_t ak, const float *B, int64_t ldb, float *C,
                    int64_t ldc, int64_t cols, int64_t k_end, int from_row, int to_row, int accumulate) {
    for (int64_t r = 0; r < rows; r += 4) {
        int64_t n = rows - r < 4 ? rows - r : 4;
        int64_t k0 = from_row ? r : 0, k1 = to_row ? (r + n < k_end ? r + n : k_end) : k_end, c = 0;
        const float *a = A + r * ar;
        float *out = C + r * ldc;
        if (n == 4) {
            c = cols & ~(int64_t)15;
            mul_4xcols(a, ar, ak, B, ldb, out, ldc, c, k0, k1, accumulate);
        }
        for (; c < cols; c += 8) mul_rx8(n, a, ar, ak, B + c, ldb, out + c, ldc, k0, k1, accumulate);
    }
}

/* dst[d, j] = src[j, d] for j < n (dst's row stride ld; columns n..round16(n)-1, which `scores` reads, zeroed) */
static void transpose_rows(const float *src, int64_t src_stride, int64_t n, int64_t dim, float *dst, int64_t ld) {
    for (int64_t d = 0; d < dim; d++) {
        float *row = dst + d * ld;
        for (int64_t j = 0; j < n; j++) row[j] = src[j * src_stride + d];
        for (int64_t j = n; j < round16(n); j++) row[j] = 0.0f;
    }
}

/* S[i, 0:ceil16(i+1)] = Q_i . K_j for every row i (entries past the row's own width are left as computed) */
static void scores(int64_t n, const float *q, int64_t q_stride, const float *kt, int64_t ld, int64_t dim, float *s) {
    for (int64_t r = 0; r < n; r += 4) {
        int64_t rows = n - r < 4 ? n - r : 4, width = round16(r + rows), c = 0;
        if (rows == 4) {
            mul_4xcols(q + r * q_stride, q_stride, 1, kt, ld, s + r * ld, ld, width, 0, dim, 0);
            c = width;
        }
        for (; c < width; c += 8) mul_rx8(rows, q + r * q_stride, q_stride, 1, kt + c, ld, s + r * ld + c, ld, 0, dim, 0);
    }
}

/* Row i of P = softmax(scale * S[i, 0..i]), zeros after it up to column round16(i + 1) (`product` reads a causal row
 * block's products at most 3 columns past a row's diagonal; the rest is never read, so not written); returns the
 * row's log-sum-exp. With `lse_in` (the backward), P is rebuilt from the forward's log-sum-exp instead. */
static float softmax_row(float *s, int64_t i, float scale, const float *lse_in) {
    int64_t n = i + 1, j;
    __m256 vs = _mm256_set1_ps(scale);
    float peak, total = 0.0f;
    if (lse_in) {
        peak = *lse_in;
    } else {
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (j = 0; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
        float m[8];
        _mm256_storeu_ps(m, vmax);
        peak = m[0];
        for (int t = 1; t < 8; t++) peak = m[t] > peak ? m[t] : peak;
        for (; j < n; j++) peak = s[j] > peak ? s[j] : peak;
        peak *= scale;
    }
    __m256 vpeak = _mm256_set1_ps(peak), vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vpeak));
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    for (; j < n; j++) {
        s[j] = expf(s[j] * scale - peak);
        total += s[j];
    }
    for (int64_t z = n; z < round16(n); z++) s[z] = 0.0f;
    if (lse_in) return peak;
    float parts[8];
    _mm256_storeu_ps(parts, vsum);
    for (int t = 0; t < 8; t++) total += parts[t];
    __m256 inv = _mm256_set1_ps(1.0f / total);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
    for (; j < n; j++) s[j] *= 1.0f / total;
    return peak + logf(total);
}

typedef struct { int64_t start, length, head; } Task;

static int longer_first(const void *a, const void *b) {
    const Task *x = a, *y = b;
    return (x->length < y->length) - (x->length > y->length);
}

/* (example, head) tasks, longest examples first so that the last tasks to start are short ones */
static Task *make_tasks(const int64_t *bounds, int64_t examples, int64_t heads, int64_t *count) {
    Task *tasks = malloc(sizeof(Task) * examples * heads);
    int64_t n = 0;
    *count = 0;
    if (tasks == NULL) return NULL;
    for (int64_t e = 0; e < examples; e++)
        for (int64_t h = 0; h < heads; h++)
            if (bounds[e + 1] > bounds[e]) tasks[n++] = (Task){bounds[e], bounds[e + 1] - bounds[e], h};
    qsort(tasks, n, sizeof(Task), longer_first);
    *count = n;
    return tasks;
}

int peftkit_attention_forward(const float *q, const float *k, const float *v, float *out, float *lse,
                               const int64_t *bounds, int64_t examples, int64_t tokens, int64_t heads,
                               int64_t kv_heads, int64_t dim, int64_t q_st, int64_t q_sh, int64_t kv_st,
                               int64_t kv_sh, int64_t v_st, int64_t v_sh, int64_t max_len, float scale,
                               int threads) {
    int64_t count, ld = round16(max_len), group = heads / kv_heads;
    Task *tasks = make_tasks(bounds, examples, kv_heads, &count);  /* one per key/value head: its K^T made once */
    int failed = tasks == NULL && examples * kv_heads > 0;
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        float *kt = failed ? NULL : aligned_alloc(32, sizeof(float) * (dim * ld + ld * ld));
        float *s = kt == NULL ? NULL : kt + dim * ld;
        if (kt == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < count; t++) {
            if (kt == NULL) continue;  /* this thread has no scratch: the call fails, its tasks are skipped */
            int64_t n = tasks[t].length, g = tasks[t].head, t0 = tasks[t].start;
            transpose_rows(k + t0 * kv_st + g * kv_sh, kv_st, n, dim, kt, ld);
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                scores(n, q + t0 * q_st + h * q_sh, q_st, kt, ld, dim, s);
                for (int64_t i = 0; i < n; i++) lse[h * tokens + t0 + i] = softmax_row(s + i * ld, i, scale, NULL);
                product(n, s, ld, 1, v + t0 * v_st + g * v_sh, v_st, out + (t0 * heads + h) * dim, heads * dim,
                        dim, n, 0, 1, 0);
            }
        }
        free(kt);
    }
    free(tasks);
    return failed ? -1 : 0;  /* -1: scratch memory could not be allocated */
}

int peftkit_attention_backward(const float *grad, const float *q, const float *k, const float *v, const float *out,
                                const float *lse, float *dq, float *dk, float *dv, const int64_t *bounds,
                                int64_t examples, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                                int64_t q_st, int64_t q_sh, int64_t kv_st, int64_t kv_sh, int64_t v_st, int64_t v_sh,
                                int64_t max_len, float scale, int threads) {
    int64_t count, ld = round16(max_len), group = heads / kv_heads;
    Task *tasks = make_tasks(bounds, examples, kv_heads, &count);  /* one task per key/value head: it owns dk, dv */
    int failed = tasks == NULL && examples * kv_heads > 0;
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        float *kt = failed ? NULL : aligned_alloc(32, sizeof(float) * (2 * dim * ld + 2 * ld * ld));
        float *vt = kt == NULL ? NULL : kt + dim * ld, *p = vt == NULL ? NULL : vt + dim * ld;
        float *ds = p == NULL ? NULL : p + ld * ld;
        if (kt == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < count; t++) {
            if (kt == NULL) continue;
            int64_t n = tasks[t].length, g = tasks[t].head, t0 = tasks[t].start;
            const float *kg = k + t0 * kv_st + g * kv_sh, *vg = v + t0 * v_st + g * v_sh;
            float *dkg = dk + (t0 * kv_heads + g) * dim, *dvg = dv + (t0 * kv_heads + g) * dim;
            transpose_rows(kg, kv_st, n, dim, kt, ld);
            transpose_rows(vg, v_st, n, dim, vt, ld);
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const float *qh = q + t0 * q_st + h * q_sh;
                const float *gh = grad + (t0 * heads + h) * dim, *oh = out + (t0 * heads + h) * dim;
                scores(n, qh, q_st, kt, ld, dim, p);
                scores(n, gh, heads * dim, vt, ld, dim, ds);  /* dP = dO V^T */
                for (int64_t i = 0; i < n; i++) {
                    float *pi = p + i * ld, *di = ds + i * ld;
                    float dot = dot8(gh + i * heads * dim, oh + i * heads * dim, dim);  /* rowsum(dO * O) */
                    softmax_row(pi, i, scale, lse + h * tokens + t0 + i);
                    for (int64_t j = 0; j <= i; j++) di[j] = scale * pi[j] * (di[j] - dot);
                    for (int64_t j = i + 1; j < round16(i + 1); j++) di[j] = 0.0f;
                }
                product(n, ds, ld, 1, kg, kv_st, dq + (t0 * heads + h) * dim, heads * dim, dim, n, 0, 1, 0);
                /* dK += dS^T Q and dV += P^T dO: dS and P read transposed */
                product(n, ds, 1, ld, qh, q_st, dkg, kv_heads * dim, dim, n, 1, 0, 1);
                product(n, p, 1, ld, gh, heads * dim, dvg, kv_heads * dim, dim, n, 1, 0, 1);
            }
        }
        free(kt);
    }
    free(tasks);
    return failed ? -1 : 0;  /* -1: scratch memory could not be allocated */
}

/* ---------------------------------------------------------------------------------------------------------------
 * The fused LM head's softmax numerators (objectives/fused_head.py), fp32, in place: for the chunk's logits transposed
 * (x: a row per vocabulary entry, `rows` of them at row stride ld, `cols` columns), peak[c] = the max over v, then
 * x[v, c] = exp(x[v, c] - peak[c]) and sums[c] = the sum over v. Two passes over the 50-75 MB of a chunk's logits
 * where torch takes four (amax, sub_, exp_, sum). The rows are cut into fixed blocks, each reduced on its own and the
 * block results combined in block order: results do not depend on the thread count.
 */
#define EXP_BLOCK 256

int peftkit_exp_columns(float *x, int64_t rows, int64_t ld, int64_t cols, float *peak, float *sums, int threads) {
    int64_t blocks = (rows + EXP_BLOCK - 1) / EXP_BLOCK, vec = cols & ~(int64_t)7;
    float *partial = malloc(sizeof(float) * (blocks * cols + 1));
    if (partial == NULL) return -1;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            float *acc = partial + b * cols;
            int64_t end = (b + 1) * EXP_BLOCK < rows ? (b + 1) * EXP_BLOCK : rows;
            for (int64_t c = 0; c < cols; c++) acc[c] = x[b * EXP_BLOCK * ld + c];
            for (int64_t v = b * EXP_BLOCK + 1; v < end; v++) {
                const float *row = x + v * ld;
                int64_t c = 0;
                for (; c < vec; c += 8)
                    _mm256_storeu_ps(acc + c, _mm256_max_ps(_mm256_loadu_ps(acc + c), _mm256_loadu_ps(row + c)));
                for (; c < cols; c++) acc[c] = row[c] > acc[c] ? row[c] : acc[c];
            }
        }
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < cols; c++) {
            float top = partial[c];
            for (int64_t b = 1; b < blocks; b++) top = partial[b * cols + c] > top ? partial[b * cols + c] : top;
            peak[c] = top;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            float *acc = partial + b * cols;
            int64_t end = (b + 1) * EXP_BLOCK < rows ? (b + 1) * EXP_BLOCK : rows;
            for (int64_t c = 0; c < cols; c++) acc[c] = 0.0f;
            for (int64_t v = b * EXP_BLOCK; v < end; v++) {
                float *row = x + v * ld;
                int64_t c = 0;
                for (; c < vec; c += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(peak + c)));
                    _mm256_storeu_ps(row + c, e);
                    _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), e));
                }
                for (; c < cols; c++) {
                    row[c] = expf(row[c] - peak[c]);
                    acc[c] += row[c];
                }
            }
        }
    }
    for (int64_t c = 0; c < cols; c++) {
        float total = 0.0f;
        for (int64_t b = 0; b < blocks; b++) total += partial[b * cols + c];
        sums[c] = total;
    }
    free(partial);
    return 0;
}
