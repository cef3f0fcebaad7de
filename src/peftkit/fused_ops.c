/* peftkit's fused operators for training on x86-64 CPUs with AVX2 + FMA (fused_ops.py): norms and SwiGLU in fp32 and
 * bf16; attention, rotary embeddings and the fused LM head's softmax in fp32 (rotary in bf16 too; attention in bf16
 * on CPUs with AVX512_BF16, in functions compiled for it and called only there).
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
 * The same attention for bf16 q, k, v and incoming gradient, on CPUs with AVX512_BF16 (fused_ops.attention on a bf16
 * base): the products on `vdpbf16ps`, which multiplies pairs of bf16 values exactly and adds both products to an fp32
 * sum, at twice the fp32 FMA rate. The softmax, its log-sum-exp and dS = scale * P * (dP - rowsum(dO * O)) stay fp32;
 * P and dS are rounded to bf16 to enter the products that read them (P V, dS K, dS^T Q, P^T dO), as torch's CPU flash
 * attention rounds P for its P V. Outputs fp32: out, lse, dq, dk and dv as in the fp32 kernel.
 *
 * Why: with q, k and v widened to fp32 for the fp32 kernel, attention was ~11% of a bf16 LoRA step of SmolLM2
 * (docs/performance.md, "The attention kernel on bf16 dot products").
 *
 * A product's operands: A[r, kk] is a pair of bf16 values (a 32-bit word) at A + r * ar + kk * ak, in words (a bf16
 * matrix read by rows has ak = 1; a pair-interleaved one read transposed has ar = 1); B[kk] is a row of words, word j
 * holding B's rows 2kk and 2kk + 1 at column j. The scores read K^T this way without any interleaving (a word of K's
 * row j is two of its dims), P V and dS K read V and K with their rows interleaved in pairs. Rows are done 4 at a
 * time in this thread's order over the reduced dimension, so results do not depend on the thread count.
 */
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10  /* compilers that know AVX512_BF16 */
#define DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

int peftkit_has_bf16_dot(void) {  /* 1: the functions below exist and this CPU runs them */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static inline uint32_t word_at(const uint32_t *p) {  /* bf16 tensors are 2-byte aligned only */
    uint32_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

/* C[r, 0:16 nc] (+)= sum over kk in [kk0, kk1) of A[r, kk] . B[kk, 0:16 nc] for the 4 rows r; rows >= `rows` read
 * row rows - 1 again and are not stored. nc (1-4) is a constant where inlined, so the 4 x nc sums stay in
 * registers. */
static inline __attribute__((always_inline)) DOT_TARGET void dot_4xnc(
        int nc, int64_t rows, const uint32_t *A, int64_t ar, int64_t ak, const uint32_t *B, int64_t ldb, float *C,
        int64_t ldc, int64_t kk0, int64_t kk1, int accumulate) {
    __m512 acc[4][4];
    const uint32_t *a[4];
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        a[r] = A + (r < rows ? r : rows - 1) * ar;
        #pragma GCC unroll 4
        for (int c = 0; c < nc; c++)
            acc[r][c] = accumulate && r < rows ? _mm512_loadu_ps(C + r * ldc + 16 * c) : _mm512_setzero_ps();
    }
    for (int64_t kk = kk0; kk < kk1; kk++) {
        __m512bh b[4];
        #pragma GCC unroll 4
        for (int c = 0; c < nc; c++) b[c] = (__m512bh)_mm512_loadu_si512(B + kk * ldb + 16 * c);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m512bh x = (__m512bh)_mm512_set1_epi32((int)word_at(a[r] + kk * ak));
            #pragma GCC unroll 4
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x, b[c]);
        }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
        #pragma GCC unroll 4
        for (int c = 0; c < nc; c++)
            if (r < rows) _mm512_storeu_ps(C + r * ldc + 16 * c, acc[r][c]);
}

/* C[0:rows, 0:cols] (+)= A[0:rows, k] B[k, 0:cols] over k in [k0, k1) (elements, k0 even), cols a multiple of 16 */
static DOT_TARGET void dot_rows(int64_t rows, const uint32_t *A, int64_t ar, int64_t ak, const uint32_t *B,
                                int64_t ldb, float *C, int64_t ldc, int64_t cols, int64_t k0, int64_t k1,
                                int accumulate) {
    int64_t kk0 = k0 / 2, kk1 = (k1 + 1) / 2, c = 0;
    for (; c + 64 <= cols; c += 64) dot_4xnc(4, rows, A, ar, ak, B + c, ldb, C + c, ldc, kk0, kk1, accumulate);
    switch ((cols - c) / 16) {  /* the rest in one pass: more independent sums than 16 columns at a time */
        case 3: dot_4xnc(3, rows, A, ar, ak, B + c, ldb, C + c, ldc, kk0, kk1, accumulate); break;
        case 2: dot_4xnc(2, rows, A, ar, ak, B + c, ldb, C + c, ldc, kk0, kk1, accumulate); break;
        case 1: dot_4xnc(1, rows, A, ar, ak, B + c, ldb, C + c, ldc, kk0, kk1, accumulate); break;
        default: break;
    }
}

/* C[0:n, 0:cols] (+)= A B row block by row block (4 rows), where row block r takes k from `from_row` ? r : 0 up to
 * `to_row` ? r + its rows : k_end (the causal triangle; A's entries past a row's own range must be zero, and B's row
 * k_end too when k_end is odd) */
static DOT_TARGET void dot_product(int64_t n, const uint32_t *A, int64_t ar, int64_t ak, const uint32_t *B,
                                   int64_t ldb, float *C, int64_t ldc, int64_t cols, int64_t k_end, int from_row,
                                   int to_row, int accumulate) {
    for (int64_t r = 0; r < n; r += 4) {
        int64_t rows = n - r < 4 ? n - r : 4;
        dot_rows(rows, A + r * ar, ar, ak, B, ldb, C + r * ldc, ldc, cols, from_row ? r : 0, to_row ? r + rows : k_end,
                 accumulate);
    }
}

/* dst[kk * ld + j] = the word of M's row j at dims 2kk, 2kk + 1 (j < n; zeros for j in [n, round16(n))) */
static void pack_transposed(const uint16_t *m, int64_t stride, int64_t n, int64_t dim, uint32_t *dst, int64_t ld) {
    for (int64_t j = 0; j < n; j++) {
        const uint32_t *row = (const uint32_t *)(m + j * stride);
        for (int64_t kk = 0; kk < dim / 2; kk++) dst[kk * ld + j] = word_at(row + kk);
    }
    for (int64_t kk = 0; kk < dim / 2; kk++)
        for (int64_t j = n; j < round16(n); j++) dst[kk * ld + j] = 0;
}

/* 32 bf16 of `lo` and 32 of `hi` interleaved: words lo[i] | hi[i] << 16, for i in [0, 16) (first) and [16, 32) */
static inline DOT_TARGET void interleave32(__m512i lo, __m512i hi, uint32_t *first, uint32_t *second) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    _mm512_storeu_si512(first, _mm512_permutex2var_epi16(lo, low, hi));
    _mm512_storeu_si512(second, _mm512_permutex2var_epi16(lo, high, hi));
}

/* dst[jj * dim + d] = the word (M[2jj, d], M[2jj + 1, d]) for 2jj < n, row n as zeros; dim a multiple of 16 */
static DOT_TARGET void pack_row_pairs(const uint16_t *m, int64_t stride, int64_t n, int64_t dim, uint32_t *dst) {
    for (int64_t j = 0; j < n; j += 2) {
        const uint16_t *lo = m + j * stride, *hi = lo + stride;
        uint32_t *out = dst + (j / 2) * dim;
        int64_t d = 0;
        for (; d + 32 <= dim; d += 32)
            interleave32(_mm512_loadu_si512(lo + d), j + 1 < n ? _mm512_loadu_si512(hi + d) : _mm512_setzero_si512(),
                         out + d, out + d + 16);
        for (; d < dim; d++) out[d] = lo[d] | (j + 1 < n ? (uint32_t)hi[d] << 16 : 0u);
    }
}

/* 16 fp32 as bf16 (nearest, ties to even), in the low half */
static inline DOT_TARGET __m256i bf16x16(const float *p) { return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)); }

/* rows lo and hi (fp32, `width` columns, a multiple of 16) as bf16 words lo[j] | hi[j] << 16 */
static inline DOT_TARGET void interleave_rows(const float *lo, const float *hi, int64_t width, uint32_t *dst) {
    for (int64_t j = 0; j < width; j += 32) {
        __m512i a = _mm512_castsi256_si512(bf16x16(lo + j)), b = _mm512_castsi256_si512(bf16x16(hi + j));
        if (j + 16 < width) {
            a = _mm512_inserti64x4(a, bf16x16(lo + j + 16), 1);
            b = _mm512_inserti64x4(b, bf16x16(hi + j + 16), 1);
            interleave32(a, b, dst + j, dst + j + 16);
        } else {
            uint32_t spare[16];
            interleave32(a, b, dst + j, spare);
        }
    }
}

/* rows [0, rows) of a 4-row fp32 block (row stride ld, `width` columns) as bf16 rows (row stride ld bf16 values) */
static inline DOT_TARGET void to_bf16_rows(const float *s, int64_t rows, int64_t width, int64_t ld, uint16_t *dst) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < width; j += 16)
            _mm256_storeu_si256((__m256i *)(dst + r * ld + j), bf16x16(s + r * ld + j));
}

/* sum of a[d] * b[d] over d < dim (a multiple of 16), a bf16, in sixteen lanes */
static inline DOT_TARGET float bf16_dot_fp32(const uint16_t *a, const float *b, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + d))), 16));
        acc = _mm512_fmadd_ps(wide, _mm512_loadu_ps(b + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

int DOT_TARGET peftkit_attention_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, float *out,
                                              float *lse, const int64_t *bounds, int64_t examples, int64_t tokens,
                                              int64_t heads, int64_t kv_heads, int64_t dim, int64_t q_st,
                                              int64_t q_sh, int64_t kv_st, int64_t kv_sh, int64_t v_st, int64_t v_sh,
                                              int64_t max_len, float scale, int threads) {
    int64_t count, ld = round16(max_len), group = heads / kv_heads, half = dim / 2;
    Task *tasks = make_tasks(bounds, examples, kv_heads, &count);
    int failed = tasks == NULL && examples * kv_heads > 0;
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        /* K^T's words, V's row pairs, a 4-row block of scores and of P in bf16 */
        size_t words = half * ld + (ld / 2) * dim + 2 * ld;
        uint32_t *kt = failed ? NULL : aligned_alloc(64, sizeof(uint32_t) * words + sizeof(float) * 4 * ld);
        uint32_t *vp = kt == NULL ? NULL : kt + half * ld, *pb = vp == NULL ? NULL : vp + (ld / 2) * dim;
        float *s = pb == NULL ? NULL : (float *)(pb + 2 * ld);
        if (kt == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < count; t++) {
            if (kt == NULL) continue;
            int64_t n = tasks[t].length, g = tasks[t].head, t0 = tasks[t].start;
            pack_transposed(k + t0 * kv_st + g * kv_sh, kv_st, n, dim, kt, ld);
            pack_row_pairs(v + t0 * v_st + g * v_sh, v_st, n, dim, vp);
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const uint16_t *qh = q + t0 * q_st + h * q_sh;
                for (int64_t r = 0; r < n; r += 4) {
                    int64_t rows = n - r < 4 ? n - r : 4, width = round16(r + rows);
                    dot_rows(rows, (const uint32_t *)(qh + r * q_st), q_st / 2, 1, kt, ld, s, ld, width, 0, dim, 0);
                    for (int64_t i = r; i < r + rows; i++)
                        lse[h * tokens + t0 + i] = softmax_row(s + (i - r) * ld, i, scale, NULL);
                    to_bf16_rows(s, rows, width, ld, (uint16_t *)pb);
                    dot_rows(rows, pb, ld / 2, 1, vp, dim, out + ((t0 + r) * heads + h) * dim, heads * dim, dim, 0,
                             r + rows, 0);
                }
            }
        }
        free(kt);
    }
    free(tasks);
    return failed ? -1 : 0;
}

int DOT_TARGET peftkit_attention_backward_bf16(const uint16_t *grad, const uint16_t *q, const uint16_t *k,
                                               const uint16_t *v, const float *out, const float *lse, float *dq,
                                               float *dk, float *dv, const int64_t *bounds, int64_t examples,
                                               int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                                               int64_t q_st, int64_t q_sh, int64_t kv_st, int64_t kv_sh, int64_t v_st,
                                               int64_t v_sh, int64_t max_len, float scale, int threads) {
    int64_t count, ld = round16(max_len), group = heads / kv_heads, half = dim / 2;
    Task *tasks = make_tasks(bounds, examples, kv_heads, &count);
    int failed = tasks == NULL && examples * kv_heads > 0;
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        /* K^T's and V^T's words; K's, Q's and dO's row pairs; dS and P with their rows interleaved in pairs (read
         * transposed by dK and dV); 4-row blocks of dS in bf16, and of scores and dP in fp32 */
        size_t words = 2 * half * ld + 3 * (ld / 2) * dim + 2 * (ld / 2) * ld + 2 * ld;
        uint32_t *kt = failed ? NULL : aligned_alloc(64, sizeof(uint32_t) * words + sizeof(float) * 8 * ld);
        uint32_t *vt = kt == NULL ? NULL : kt + half * ld, *kp = vt == NULL ? NULL : vt + half * ld;
        uint32_t *qp = kp == NULL ? NULL : kp + (ld / 2) * dim, *gp = qp == NULL ? NULL : qp + (ld / 2) * dim;
        uint32_t *dsi = gp == NULL ? NULL : gp + (ld / 2) * dim, *pi = dsi == NULL ? NULL : dsi + (ld / 2) * ld;
        uint32_t *dsb = pi == NULL ? NULL : pi + (ld / 2) * ld;
        float *p = dsb == NULL ? NULL : (float *)(dsb + 2 * ld), *ds = p == NULL ? NULL : p + 4 * ld;
        if (kt == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < count; t++) {
            if (kt == NULL) continue;
            int64_t n = tasks[t].length, g = tasks[t].head, t0 = tasks[t].start;
            const uint16_t *kg = k + t0 * kv_st + g * kv_sh, *vg = v + t0 * v_st + g * v_sh;
            float *dkg = dk + (t0 * kv_heads + g) * dim, *dvg = dv + (t0 * kv_heads + g) * dim;
            pack_transposed(kg, kv_st, n, dim, kt, ld);
            pack_transposed(vg, v_st, n, dim, vt, ld);
            pack_row_pairs(kg, kv_st, n, dim, kp);
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const uint16_t *qh = q + t0 * q_st + h * q_sh, *gh = grad + (t0 * heads + h) * dim;
                const float *oh = out + (t0 * heads + h) * dim;
                pack_row_pairs(qh, q_st, n, dim, qp);
                pack_row_pairs(gh, heads * dim, n, dim, gp);
                for (int64_t r = 0; r < n; r += 4) {
                    int64_t rows = n - r < 4 ? n - r : 4, width = round16(r + rows);
                    dot_rows(rows, (const uint32_t *)(qh + r * q_st), q_st / 2, 1, kt, ld, p, ld, width, 0, dim, 0);
                    dot_rows(rows, (const uint32_t *)(gh + r * heads * dim), heads * dim / 2, 1, vt, ld, ds, ld,
                             width, 0, dim, 0);  /* dP = dO V^T */
                    for (int64_t i = r; i < r + 4; i++) {
                        float *pr = p + (i - r) * ld, *dr = ds + (i - r) * ld;
                        if (i >= n) {  /* past the example: zero rows, the second half of the last pair */
                            memset(pr, 0, sizeof(float) * width);
                            memset(dr, 0, sizeof(float) * width);
                            continue;
                        }
                        float dot = bf16_dot_fp32(gh + i * heads * dim, oh + i * heads * dim, dim);
                        softmax_row(pr, i, scale, lse + h * tokens + t0 + i);
                        for (int64_t j = 0; j <= i; j++) dr[j] = scale * pr[j] * (dr[j] - dot);
                        for (int64_t j = i + 1; j < width; j++) pr[j] = dr[j] = 0.0f;
                    }
                    to_bf16_rows(ds, rows, width, ld, (uint16_t *)dsb);
                    for (int64_t i = r; i < r + 4 && i < n; i += 2) {
                        interleave_rows(ds + (i - r) * ld, ds + (i - r + 1) * ld, width, dsi + (i / 2) * ld);
                        interleave_rows(p + (i - r) * ld, p + (i - r + 1) * ld, width, pi + (i / 2) * ld);
                    }
                    dot_rows(rows, dsb, ld / 2, 1, kp, dim, dq + ((t0 + r) * heads + h) * dim, heads * dim, dim, 0,
                             r + rows, 0);  /* dQ = dS K */
                }
                /* dK += dS^T Q and dV += P^T dO: dS and P read transposed from their interleaved rows */
                dot_product(n, dsi, 1, ld, qp, dim, dkg, kv_heads * dim, dim, n, 1, 0, 1);
                dot_product(n, pi, 1, ld, gp, dim, dvg, kv_heads * dim, dim, n, 1, 0, 1);
            }
        }
        free(kt);
    }
    free(tasks);
    return failed ? -1 : 0;
}
#else
int peftkit_has_bf16_dot(void) { return 0; }  /* an older compiler: bf16 attention takes the fp32 kernel */
#endif

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
