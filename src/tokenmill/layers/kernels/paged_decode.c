/* Decode attention over a paged KV cache on CPU: one query token per row.
 *
 * Reads each row's keys and values straight from its blocks, so nothing is gathered
 * or copied. One task per (row, KV head) computes the scores of the group's query
 * heads, a float32 softmax and the weighted sum of values.
 *
 * q, out: (R, H, D); k_cache, v_cache: (num_blocks, block_size, H_kv, D);
 * tables: (R, width) block ids; lens: (R,) keys each row sees; window <= 0 means none.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0, vectorizable (libm's expf is not, and softmax is most of the work).
 * 2^t = 2^n * 2^f with n = trunc(t) and f in (-1, 0]; 2^f is a degree-6 least-squares
 * fit on [-1, 0] with relative error below 2e-7 in float32. */
static inline float exp_nonpositive(float x) {
    if (x != x) return x; /* NaN in, NaN out, as the reference path gives */
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const int n = (int)t;
    const float f = t - (float)n;
    float p = 1.0938758e-4f;
    p = p * f + 1.2757171e-3f;
    p = p * f + 9.5800603e-3f;
    p = p * f + 5.5491037e-2f;
    p = p * f + 2.4022436e-1f;
    p = p * f + 6.9314705e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#define DEFINE_DECODE(NAME, T, LOAD, STORE)                                                          \
    int NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *tables, int64_t width,    \
             const int64_t *lens, T *out, int R, int H, int Hkv, int D, int Dv, int block_size,       \
             float scale, int window, int nthreads) {                                                 \
        const int g = H / Hkv;                                                                        \
        int failed = 0;                                                                               \
        const int64_t kstride = (int64_t)Hkv * D, vstride = (int64_t)Hkv * Dv;                        \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                       \
        for (int task = 0; task < R * Hkv; ++task) {                                                  \
            const int r = task / Hkv, hk = task % Hkv;                                                \
            const int64_t len = lens[r];                                                              \
            const int64_t first = (window > 0 && len > window) ? len - window : 0;                   \
            const int64_t n = len - first;                                                            \
            float *qf = (float *)malloc(sizeof(float) * (size_t)g * D);                               \
            float *sc = (float *)malloc(sizeof(float) * (size_t)g * (n > 0 ? n : 1));                 \
            float *acc = (float *)calloc((size_t)g * Dv, sizeof(float));                              \
            float *kf = (float *)malloc(sizeof(float) * (size_t)(D > Dv ? D : Dv));                   \
            if (!qf || !sc || !acc || !kf) {                                                          \
                _Pragma("omp atomic write")                                                           \
                failed = 1; /* reported to the caller, which falls back to PyTorch */                \
                free(qf);                                                                             \
                free(sc);                                                                             \
                free(acc);                                                                            \
                free(kf);                                                                             \
                continue;                                                                             \
            }                                                                                         \
            for (int j = 0; j < g; ++j)                                                               \
                for (int d = 0; d < D; ++d)                                                           \
                    qf[j * D + d] = LOAD(q[((int64_t)r * H + hk * g + j) * D + d]) * scale;           \
            const int64_t *table = tables + (int64_t)r * width;                                       \
            /* Scores, block by block: no division per token. */                                     \
            for (int64_t b = first / block_size, t = 0; b * block_size < len; ++b) {                  \
                const int64_t p0 = b * block_size;                                                    \
                const int o0 = p0 < first ? (int)(first - p0) : 0;                                   \
                const int o1 = len - p0 < block_size ? (int)(len - p0) : block_size;                  \
                const T *kb = k_cache + table[b] * block_size * kstride + (int64_t)hk * D;            \
                for (int o = o0; o < o1; ++o, ++t) {                                                  \
                    const T *kp = kb + o * kstride;                                                   \
                    _Pragma("omp simd")                                                               \
                    for (int d = 0; d < D; ++d) kf[d] = LOAD(kp[d]);                                  \
                    for (int j = 0; j < g; ++j) {                                                     \
                        const float *qj = qf + j * D;                                                 \
                        float s = 0.f;                                                                \
                        _Pragma("omp simd reduction(+ : s)")                                          \
                        for (int d = 0; d < D; ++d) s += qj[d] * kf[d];                               \
                        sc[j * n + t] = s;                                                            \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            for (int j = 0; j < g; ++j) {                                                             \
                float *sj = sc + j * n;                                                               \
                float m = -INFINITY, sum = 0.f;                                                       \
                _Pragma("omp simd reduction(max : m)")                                                \
                for (int64_t t = 0; t < n; ++t) m = sj[t] > m ? sj[t] : m;                            \
                _Pragma("omp simd reduction(+ : sum)")                                                \
                for (int64_t t = 0; t < n; ++t) {                                                     \
                    sj[t] = exp_nonpositive(sj[t] - m);                                               \
                    sum += sj[t];                                                                     \
                }                                                                                     \
                const float inv = sum > 0.f ? 1.f / sum : 0.f;                                        \
                _Pragma("omp simd")                                                                   \
                for (int64_t t = 0; t < n; ++t) sj[t] *= inv;                                         \
            }                                                                                         \
            for (int64_t b = first / block_size, t = 0; b * block_size < len; ++b) {                  \
                const int64_t p0 = b * block_size;                                                    \
                const int o0 = p0 < first ? (int)(first - p0) : 0;                                   \
                const int o1 = len - p0 < block_size ? (int)(len - p0) : block_size;                  \
                const T *vb = v_cache + table[b] * block_size * vstride + (int64_t)hk * Dv;           \
                for (int o = o0; o < o1; ++o, ++t) {                                                  \
                    const T *vp = vb + o * vstride;                                                   \
                    _Pragma("omp simd")                                                               \
                    for (int d = 0; d < Dv; ++d) kf[d] = LOAD(vp[d]);                                 \
                    for (int j = 0; j < g; ++j) {                                                     \
                        const float p = sc[j * n + t];                                                \
                        float *aj = acc + j * Dv;                                                     \
                        _Pragma("omp simd")                                                           \
                        for (int d = 0; d < Dv; ++d) aj[d] += p * kf[d];                              \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            for (int j = 0; j < g; ++j)                                                               \
                for (int d = 0; d < Dv; ++d)                                                          \
                    out[((int64_t)r * H + hk * g + j) * Dv + d] = STORE(acc[j * Dv + d]);             \
            free(qf);                                                                                 \
            free(sc);                                                                                 \
            free(acc);                                                                                \
            free(kf);                                                                                 \
        }                                                                                             \
        return failed;                                                                                \
    }

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)

DEFINE_DECODE(paged_decode_bf16_generic, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_DECODE(paged_decode_f32, float, F32_LOAD, F32_STORE)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

/* The bf16 kernel on CPUs with AVX512-BF16: q.k runs as bf16 pair dot products with
 * float32 accumulation (vdpbf16ps), 32 dims per instruction, and v is widened 16 at a
 * time. Head dims must be multiples of 32 (q, k) and 16 (v); others take the generic path. */
static int paged_decode_bf16_avx512(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                    const int64_t *tables, int64_t width, const int64_t *lens, uint16_t *out,
                                    int R, int H, int Hkv, int D, int Dv, int block_size, float scale,
                                    int window, int nthreads) {
    const int g = H / Hkv;
    const int64_t kstride = (int64_t)Hkv * D, vstride = (int64_t)Hkv * Dv;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int task = 0; task < R * Hkv; ++task) {
        const int r = task / Hkv, hk = task % Hkv;
        const int64_t len = lens[r];
        const int64_t first = (window > 0 && len > window) ? len - window : 0;
        const int64_t n = len - first;
        float *sc = (float *)malloc(sizeof(float) * (size_t)g * (n > 0 ? n : 1));
        float *acc = (float *)calloc((size_t)g * Dv, sizeof(float));
        if (!sc || !acc) {
#pragma omp atomic write
            failed = 1;
            free(sc);
            free(acc);
            continue;
        }
        const uint16_t *qr = q + ((int64_t)r * H + (int64_t)hk * g) * D;
        const int64_t *table = tables + (int64_t)r * width;
        for (int64_t b = first / block_size, t = 0; b * block_size < len; ++b) {
            const int64_t p0 = b * block_size;
            const int o0 = p0 < first ? (int)(first - p0) : 0;
            const int o1 = len - p0 < block_size ? (int)(len - p0) : block_size;
            const uint16_t *kb = k_cache + table[b] * block_size * kstride + (int64_t)hk * D;
            for (int o = o0; o < o1; ++o, ++t) {
                const uint16_t *kp = kb + o * kstride;
                for (int j = 0; j < g; ++j) {
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < D; c += 32)
                        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qr + j * D + c),
                                             (__m512bh)_mm512_loadu_si512(kp + c));
                    sc[j * n + t] = _mm512_reduce_add_ps(a) * scale;
                }
            }
        }
        for (int j = 0; j < g; ++j) {
            float *sj = sc + j * n;
            float m = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t < n; ++t) m = sj[t] > m ? sj[t] : m;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < n; ++t) {
                sj[t] = exp_nonpositive(sj[t] - m);
                sum += sj[t];
            }
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
        }
        for (int64_t b = first / block_size, t = 0; b * block_size < len; ++b) {
            const int64_t p0 = b * block_size;
            const int o0 = p0 < first ? (int)(first - p0) : 0;
            const int o1 = len - p0 < block_size ? (int)(len - p0) : block_size;
            const uint16_t *vb = v_cache + table[b] * block_size * vstride + (int64_t)hk * Dv;
            for (int o = o0; o < o1; ++o, ++t) {
                const uint16_t *vp = vb + o * vstride;
                for (int c = 0; c < Dv; c += 16) {
                    const __m512 vf = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(vp + c)));
                    for (int j = 0; j < g; ++j) {
                        float *aj = acc + j * Dv + c;
                        _mm512_storeu_ps(aj, _mm512_fmadd_ps(_mm512_set1_ps(sc[j * n + t]), vf, _mm512_loadu_ps(aj)));
                    }
                }
            }
        }
        for (int j = 0; j < g; ++j)
            for (int d = 0; d < Dv; ++d)
                out[((int64_t)r * H + (int64_t)hk * g + j) * Dv + d] = f32_to_bf16(acc[j * Dv + d]);
        free(sc);
        free(acc);
    }
    return failed;
}
#endif

int paged_decode_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *tables,
                      int64_t width, const int64_t *lens, uint16_t *out, int R, int H, int Hkv, int D, int Dv,
                      int block_size, float scale, int window, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (D % 32 == 0 && Dv % 16 == 0)
        return paged_decode_bf16_avx512(q, k_cache, v_cache, tables, width, lens, out, R, H, Hkv, D, Dv,
                                        block_size, scale, window, nthreads);
#endif
    return paged_decode_bf16_generic(q, k_cache, v_cache, tables, width, lens, out, R, H, Hkv, D, Dv,
                                     block_size, scale, window, nthreads);
}
