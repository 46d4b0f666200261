/* Fused bf16 elementwise kernels for the CPU decoder layers.
 *
 * Each one replaces a chain of small PyTorch ops with one pass over the rows, rounding
 * to bf16 at the same points the PyTorch chain does: elementwise, so the results are
 * the same. (RMSNorm stays in PyTorch: its float32 sum of squares in another order
 * differs in the last bit now and then, and that was enough to change a greedy reply
 * of SmolLM2 from the one transformers gives.)
 *
 * Small inputs (a decode step's few rows) run on the calling thread: starting the
 * OpenMP team would cost more than the work.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PARALLEL_MIN_ELEMENTS (1 << 16)

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* exp(x) for any float, vectorizable: 2^t = 2^n * 2^f with n = rint(t), f in [-1/2, 1/2],
 * and 2^f by its degree-6 Taylor polynomial (relative error about 1e-7 at |f| = 1/2). */
static inline float exp_any(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = x * 1.44269504088896341f;
    const float fn = rintf(t);
    const float f = t - fn;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)((int)fn + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* Rotate-half rope, in place on the first `heads` heads of each row of x, whose rows are
 * `row_stride` elements apart (the q and k heads of a fused qkv output):
 *   x[d] = bf16(bf16(x[d] * cos[d]) + bf16(x[d +- D/2] * sin[d]))
 * with sin's first half negated, as RotaryEmbedding stores it. cos, sin: (rows, D). */
void rope_bf16(uint16_t *x, const uint16_t *cos_t, const uint16_t *sin_t, int64_t rows, int heads, int D,
               int64_t row_stride, int nthreads) {
    const int half = D / 2;
    const int par = rows * (int64_t)heads * D >= PARALLEL_MIN_ELEMENTS && nthreads > 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *c = cos_t + r * D, *s = sin_t + r * D;
        for (int h = 0; h < heads; ++h) {
            uint16_t *xh = x + r * row_stride + (int64_t)h * D;
#pragma omp simd
            for (int d = 0; d < half; ++d) {
                const float a = bf16_to_f32(xh[d]), b = bf16_to_f32(xh[d + half]);
                const float lo = round_bf16(a * bf16_to_f32(c[d])) + round_bf16(b * bf16_to_f32(s[d]));
                const float hi =
                    round_bf16(b * bf16_to_f32(c[d + half])) + round_bf16(a * bf16_to_f32(s[d + half]));
                xh[d] = f32_to_bf16(lo);
                xh[d + half] = f32_to_bf16(hi);
            }
        }
    }
}

/* The gated activations: out = bf16(bf16(act(gate)) * up) for gate_up (rows, 2 * I) =
 * [gate | up]; out (rows, I). ACT is an expression of the float x. */
#define DEFINE_GATED(NAME, ACT)                                                                  \
    void NAME(const uint16_t *gate_up, uint16_t *out, int64_t rows, int I, int nthreads) {        \
        const int par = rows * (int64_t)I >= PARALLEL_MIN_ELEMENTS && nthreads > 1;              \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")              \
        for (int64_t r = 0; r < rows; ++r) {                                                     \
            const uint16_t *g = gate_up + r * 2 * (int64_t)I, *u = g + I;                        \
            uint16_t *o = out + r * (int64_t)I;                                                  \
            _Pragma("omp simd")                                                                   \
            for (int i = 0; i < I; ++i) {                                                        \
                const float x = bf16_to_f32(g[i]);                                               \
                o[i] = f32_to_bf16(round_bf16(ACT) * bf16_to_f32(u[i]));                         \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_GATED(silu_mul_bf16, x / (1.0f + exp_any(-x)))

/* gelu_tanh(x) = 0.5 x (1 + tanh(z)), z = sqrt(2 / pi) (x + 0.044715 x^3), computed as
 * x / (1 + exp(-2z)), the same function without the cancellation of 1 + tanh(z) near -1:
 * PyTorch's float32 tanh rounds there, so for x below about -3 (gelu under 1e-2 |x|) its
 * value carries that rounding and this one does not; elsewhere the two agree to the last
 * bf16 bit but for rare ties (tested). Past exp's range (-2z > 88) the value is below
 * 1e-38 |x|, and PyTorch's 1 + tanh is 0 there: so is this. */
static inline float gelu_tanh_f32(float x) {
    const float z = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
    return -2.0f * z > 88.0f ? 0.0f * x : x / (1.0f + exp_any(-2.0f * z));
}

DEFINE_GATED(gelu_tanh_mul_bf16, gelu_tanh_f32(x))

/* Write n new key and value rows into their cache slots: row i of k goes to slot
 * slots[i] of k_cache (rows of k_row bytes), likewise v. The rows of k and v are
 * k_stride / v_stride bytes apart (views into a fused qkv output). Slots were checked
 * against the cache size by the caller. */
void kv_write(const char *k, const char *v, int64_t k_stride, int64_t v_stride, const int64_t *slots, int64_t n,
              char *k_cache, char *v_cache, int64_t k_row, int64_t v_row) {
    for (int64_t i = 0; i < n; ++i) {
        memcpy(k_cache + slots[i] * k_row, k + i * k_stride, (size_t)k_row);
        memcpy(v_cache + slots[i] * v_row, v + i * v_stride, (size_t)v_row);
    }
}

/* out[r] = the index of the largest of the n bf16 values of row r, as torch.argmax gives
 * it: the first of equal maxima, or the first NaN if the row has one. Two passes over the
 * row (the maximum, then its first index), each vectorized: a greedy step's logits are
 * read once more from L2 instead of being widened to a float32 copy first. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
static int64_t argmax_row(const uint16_t *x, int64_t n) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m512 v = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + k))), 16));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, v);
    }
    float m = _mm512_reduce_max_ps(vmax);
    for (int64_t j = k; j < n; ++j) {
        const float f = bf16_to_f32(x[j]);
        if (f != f) nan = 1;
        m = f > m ? f : m;
    }
    if (nan) {
        for (int64_t j = 0; j < n; ++j)
            if (bf16_to_f32(x[j]) != bf16_to_f32(x[j])) return j;
    }
    const __m512 vm = _mm512_set1_ps(m);
    for (k = 0; k + 16 <= n; k += 16) {
        const __m512 v = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + k))), 16));
        const __mmask16 eq = _mm512_cmp_ps_mask(v, vm, _CMP_EQ_OQ);
        if (eq) return k + __builtin_ctz((unsigned)eq);
    }
    for (; k < n; ++k)
        if (bf16_to_f32(x[k]) == m) return k;
    return 0; /* n == 0 */
}
#else
static int64_t argmax_row(const uint16_t *x, int64_t n) {
    int64_t best = 0;
    float m = n ? bf16_to_f32(x[0]) : 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const float f = bf16_to_f32(x[j]);
        if (f != f) return j;
        if (f > m) m = f, best = j;
    }
    return best;
}
#endif

void argmax_bf16(const uint16_t *x, int64_t *out, int64_t rows, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * n >= PARALLEL_MIN_ELEMENTS && rows > 1)
    for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * n, n);
}
