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

/* Every row of `in` (laid out for the weight's type) against weight row o of w (fp32 or bf16): r[b] = x_b . w_o. */
static inline void weight_row(const float *in, const void *w, int bf16, int64_t rows, int64_t k, int64_t o,
                              float *r) {
    if (bf16)
        row_bf16(in, (const uint16_t *)w + o * k, rows, k, r);
    else
        row_f32(in, (const float *)w + o * k, rows, k, r);
}

/* out[b * ld + o] = x_b . w_o + bias_o for every row of `in`. */
static void product_rows(const float *in, const void *w, int bf16, const float *bias, float *out, int64_t ld,
                         int64_t rows, int64_t k, int64_t o) {
    float r[MAX_ROWS];
    weight_row(in, w, bf16, rows, k, o, r);
    float bo = bias ? bias[o] : 0.0f;
    for (int64_t b = 0; b < rows; b++) out[b * ld + o] = r[b] + bo;
}


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
    for (int64_t o = 0; o < n; o++) product_rows(xs, w, w_bf16, bias, y, n, m, k, o);
    free(copy);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------------
   A whole decode step of a Llama-family model's decoder layers (llama_step.ARCHITECTURES), for B <= 16 rows of one
   new token each (see llama_step.py). Per layer: RMSNorm, q/k/v products (Qwen3: an RMSNorm on each head of q and
   k), rotary embedding, the new key and value written into the
   cache, attention over each row's unmasked positions, the output product added to the residual, RMSNorm, gate and
   up products with SiLU(gate) * up, the down product added to the residual. One OpenMP parallel region for all
   layers: threads split the products by output feature (the same dot functions as peftkit_gemv, so each product's
   elements equal that kernel's) and attention by (row, head); the norms run on one thread.

   Why: at batch 1 the ~60 small torch operators per layer around the products (and their Python) took as long as the
   products themselves on a 2-core EPYC. Norms, rotary and softmax accumulate in fp32 in their own order: results
   equal torch's to fp32 rounding, not to the bit.

   A bf16 model (bf16_model = 1: bf16 weights and cache): every operator still computes in fp32 from the bf16 values,
   and its result is rounded to bf16 where torch's bf16 forward rounds it (each product's output, each elementwise
   operator's, the softmax's probabilities before they multiply V as in torch's CPU flash attention), so the numbers
   are torch's bf16 numbers up to the summation order inside a product. */

#include <math.h>
#include <omp.h>

typedef struct {
    const void *w[7];        /* q, k, v, o, gate, up, down: [n, k] row-major, fp32 or bf16 */
    int bf16[7];
    const float *bias[7];    /* or NULL */
    const float *norm1, *norm2;  /* RMSNorm weights [hidden] */
    void *keys, *values;     /* this layer's cache: [B, kv_heads, length, head_dim], the new position's slot last;
                                fp32, or bf16 in a bf16 model */
    int64_t stride_b, stride_h, stride_t;  /* cache strides (elements), the same for keys and values */
    /* an unmerged LoRA adapter on a projection: y += B' (A x), A [rank, k] and B' = scaling * B [n, rank], fp32 */
    const float *lora_a[7], *lora_b[7];
    int64_t rank[7];         /* 0: no adapter on this projection */
    const float *qnorm, *knorm;  /* Qwen3's RMSNorm weights [head_dim] on each head of q and k, or NULL */
} peftkit_layer;

/* fp32 -> the nearest bf16 value (ties to even), as torch's .to(torch.bfloat16), kept as fp32 */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;  /* NaN stays NaN */
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* R(v): v rounded to bf16 in a bf16 model's step, v itself in an fp32 one */
#define R(v) (bf16_model ? round_bf16(v) : (v))

/* 8 cache elements from i on, fp32 or bf16 */
static inline __attribute__((always_inline)) __m256 load8(const void *p, int64_t i, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* q . (D cache elements from `at` on) */
static inline __attribute__((always_inline)) float dot_cache(const float *q, const void *cache, int64_t at,
                                                             int64_t D, const int bf16) {
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(cache, at + i, bf16), a);
    float dot = hsum(a);
    for (; i < D; i++)
        dot += q[i] * (bf16 ? bf16_to_float(((const uint16_t *)cache)[at + i]) : ((const float *)cache)[at + i]);
    return dot;
}

/* D values (bf16 values already, in a bf16 model) into the cache at element `at` */
static void store_cache(void *cache, int64_t at, const float *v, int64_t D, int bf16) {
    if (!bf16) {
        memcpy((float *)cache + at, v, (size_t)D * sizeof(float));
        return;
    }
    uint16_t *to = (uint16_t *)cache + at;
    for (int64_t i = 0; i < D; i++) {
        uint32_t u;
        memcpy(&u, &v[i], 4);
        to[i] = (uint16_t)(u >> 16);
    }
}

/* LoRA's first product for the projections first..last-1 of L, which share the input `in` (rows k apart):
   t[(p - first) * rows * max_rank + b * max_rank + j] = A_p[j] . in_b. An orphaned `omp for`: every thread of the
   parallel region calls it. */
static void lora_down(const peftkit_layer *L, int first, int last, const float *in, int64_t rows, int64_t k,
                      float *t, int64_t max_rank) {
    if (max_rank == 0) return;  /* the same on every thread: no adapter anywhere */
    const int64_t per = rows * max_rank, total = (last - first) * per;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < total; i++) {
        int64_t p = first + i / per, j = i % per % max_rank, b = i % per / max_rank;
        if (j < L->rank[p]) dot_f32(in + b * k, L->lora_a[p] + j * k, k, t + i, 1);
    }
}

/* LoRA's second product for output feature o of projection p: B'_p[o] . t_b */
static inline float lora_up(const peftkit_layer *L, int p, int64_t o, const float *t_b) {
    const float *w = L->lora_b[p] + o * L->rank[p];
    float s = 0.0f;
    for (int64_t j = 0; j < L->rank[p]; j++) s += w[j] * t_b[j];
    return s;
}

/* Output feature o of projection p for every row: r[b] = (W x_b + bias) + LoRA, as the layer's forward computes it
   (rounded where a bf16 model's is). `in`: the input laid out for the weight's type; `low`: LoRA's A x for this
   projection, rows max_rank apart. */
static void project(const peftkit_layer *L, int p, const float *in, int64_t rows, int64_t k, int64_t o,
                    const float *low, int64_t max_rank, int bf16_model, float *r) {
    weight_row(in, L->w[p], L->bf16[p], rows, k, o, r);
    const float bo = L->bias[p] ? L->bias[p][o] : 0.0f;
    for (int64_t b = 0; b < rows; b++) {
        float v = R(r[b] + bo);
        if (L->rank[p]) v = R(v + R(lora_up(L, p, o, low + b * max_rank)));
        r[b] = v;
    }
}

static void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t n, float eps,
                     int bf16_model) {
    for (int64_t b = 0; b < rows; b++) {
        const float *xb = x + b * n;
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++) s += xb[i] * xb[i];
        float r = 1.0f / sqrtf(s / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[b * n + i] = R(w[i] * R(xb[i] * r));
    }
}

/* hidden: [B, H], updated in place (bf16 values in a bf16 model). cos, sin: [B, D]. mask: [B, length] (1: attend).
   max_rank: the largest LoRA rank in `layers` (0: none). bf16_model: see above. scratch: see llama_step.py. */
int peftkit_decode_layers(const peftkit_layer *layers, int64_t n_layers, float *hidden, const float *cos,
                          const float *sin, const int64_t *mask, int64_t rows, int64_t length, int64_t H,
                          int64_t heads, int64_t kv_heads, int64_t D, int64_t I, float eps, float scaling,
                          int64_t max_rank, int bf16_model, float *scratch, int threads) {
    if (rows > 16 || D % 2 || D > 512 || heads % kv_heads) return -1;
    const int64_t QN = heads * D, KN = kv_heads * D, groups = heads / kv_heads, half = D / 2;
    const int64_t width = H > I ? (H > QN ? H : QN) : (I > QN ? I : QN);
    float *x = scratch;                    /* normalized input, [B, width] */
    float *xs = x + rows * width;          /* x prepared for bf16 weights */
    float *qkv = xs + rows * width;        /* [B, QN + 2 KN] */
    float *att = qkv + rows * (QN + 2 * KN);   /* [B, QN] */
    float *act = att + rows * QN;          /* [B, I] */
    float *low = act + rows * I;           /* LoRA's A x: [3, B, max_rank] */
    float *probs = low + 3 * rows * max_rank;  /* [threads, length] */
    const int64_t QKV = QN + 2 * KN;
#pragma omp parallel num_threads(threads)
    {
        for (int64_t l = 0; l < n_layers; l++) {
            const peftkit_layer *L = &layers[l];
#pragma omp single
            {
                rms_norm(hidden, L->norm1, x, rows, H, eps, bf16_model);
                if (L->bf16[0] || L->bf16[1] || L->bf16[2]) split_pairs(x, xs, rows, H);
            }
            lora_down(L, 0, 3, x, rows, H, low, max_rank);
            /* q, k, v: one loop over their output features together */
#pragma omp for schedule(static)
            for (int64_t o = 0; o < QKV; o++) {
                int p = o < QN ? 0 : (o < QN + KN ? 1 : 2);
                int64_t at = p == 0 ? o : (p == 1 ? o - QN : o - QN - KN);
                float r[MAX_ROWS];
                /* weight row `at` of projection p is column o of qkv */
                project(L, p, L->bf16[p] ? xs : x, rows, H, at, low + p * rows * max_rank, max_rank, bf16_model, r);
                for (int64_t b = 0; b < rows; b++) qkv[b * QKV + o] = r[b];
            }
            /* (Qwen3: RMSNorm of each head of q and k), rotary embedding of q and k (rotate-half), new k and v
               into the cache */
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < rows * (heads + kv_heads); bh++) {
                int64_t b = bh / (heads + kv_heads), h = bh % (heads + kv_heads);
                float *v = qkv + b * QKV + (h < heads ? h * D : QN + (h - heads) * D);
                const float *c = cos + b * D, *s = sin + b * D;
                const float *head_norm = h < heads ? L->qnorm : L->knorm;
                if (head_norm) rms_norm(v, head_norm, v, 1, D, eps, bf16_model);
                float rotated[512];
                for (int64_t i = 0; i < D; i++) {
                    float other = i < half ? -v[i + half] : v[i - half];
                    rotated[i] = R(R(v[i] * c[i]) + R(other * s[i]));
                }
                memcpy(v, rotated, (size_t)D * sizeof(float));
                if (h >= heads) {
                    int64_t kh = h - heads, at = b * L->stride_b + kh * L->stride_h + (length - 1) * L->stride_t;
                    store_cache(L->keys, at, v, D, bf16_model);
                    store_cache(L->values, at, qkv + b * QKV + QN + KN + kh * D, D, bf16_model);
                }
            }
            /* attention: one (row, head) per iteration */
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < rows * heads; bh++) {
                int64_t b = bh / heads, h = bh % heads, kh = h / groups;
                const float *q = qkv + b * QKV + h * D;
                const int64_t base = b * L->stride_b + kh * L->stride_h;
                const int64_t *m = mask + b * length;
                float *p = probs + (int64_t)omp_get_thread_num() * length;
                float top = -INFINITY;
                for (int64_t t = 0; t < length; t++) {
                    if (!m[t]) continue;
                    const int64_t k = base + t * L->stride_t;
                    float dot = bf16_model ? dot_cache(q, L->keys, k, D, 1) : dot_cache(q, L->keys, k, D, 0);
                    p[t] = dot * scaling;
                    if (p[t] > top) top = p[t];
                }
                float total = 0.0f;
                for (int64_t t = 0; t < length; t++) {
                    if (!m[t]) continue;
                    float e = expf(p[t] - top);
                    total += e;
                    p[t] = R(e);
                }
                float *out = att + b * QN + h * D;
                for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
                const float inverse = 1.0f / total;
                for (int64_t t = 0; t < length; t++) {
                    if (!m[t]) continue;
                    const int64_t v = base + t * L->stride_t;
                    /* fp32: the normalized probability times V; bf16: the rounded exponent, normalized below */
                    if (bf16_model) {
                        const uint16_t *vv = (const uint16_t *)L->values + v;
                        for (int64_t i = 0; i < D; i++) out[i] += p[t] * bf16_to_float(vv[i]);
                    } else {
                        const float *vv = (const float *)L->values + v;
                        const float pt = p[t] / total;
                        for (int64_t i = 0; i < D; i++) out[i] += pt * vv[i];
                    }
                }
                if (bf16_model)
                    for (int64_t i = 0; i < D; i++) out[i] = round_bf16(out[i] * inverse);
            }
#pragma omp single
            if (L->bf16[3]) split_pairs(att, xs, rows, QN);
            lora_down(L, 3, 4, att, rows, QN, low, max_rank);
#pragma omp for schedule(static)
            for (int64_t o = 0; o < H; o++) {
                float r[MAX_ROWS];
                project(L, 3, L->bf16[3] ? xs : att, rows, QN, o, low, max_rank, bf16_model, r);
                for (int64_t b = 0; b < rows; b++) hidden[b * H + o] = R(hidden[b * H + o] + r[b]);
            }
#pragma omp single
            {
                rms_norm(hidden, L->norm2, x, rows, H, eps, bf16_model);
                if (L->bf16[4] || L->bf16[5]) split_pairs(x, xs, rows, H);
            }
            lora_down(L, 4, 6, x, rows, H, low, max_rank);
#pragma omp for schedule(static)
            for (int64_t o = 0; o < I; o++) {
                float g[MAX_ROWS], u[MAX_ROWS];
                project(L, 4, L->bf16[4] ? xs : x, rows, H, o, low, max_rank, bf16_model, g);
                project(L, 5, L->bf16[5] ? xs : x, rows, H, o, low + rows * max_rank, max_rank, bf16_model, u);
                for (int64_t b = 0; b < rows; b++) act[b * I + o] = R(R(g[b] / (1.0f + expf(-g[b]))) * u[b]);
            }
#pragma omp single
            if (L->bf16[6]) split_pairs(act, xs, rows, I);
            lora_down(L, 6, 7, act, rows, I, low, max_rank);
#pragma omp for schedule(static)
            for (int64_t o = 0; o < H; o++) {
                float r[MAX_ROWS];
                project(L, 6, L->bf16[6] ? xs : act, rows, I, o, low, max_rank, bf16_model, r);
                for (int64_t b = 0; b < rows; b++) hidden[b * H + o] = R(hidden[b * H + o] + r[b]);
            }
        }
    }
    return 0;
}
