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

#define DEFINE_DECODE(NAME, T, LOAD, STORE)                                                          \
    void NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *tables, int64_t width,   \
              const int64_t *lens, T *out, int R, int H, int Hkv, int D, int Dv, int block_size,      \
              float scale, int window, int nthreads) {                                                \
        const int g = H / Hkv;                                                                        \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                       \
        for (int task = 0; task < R * Hkv; ++task) {                                                  \
            const int r = task / Hkv, hk = task % Hkv;                                                \
            const int64_t len = lens[r];                                                              \
            const int64_t first = (window > 0 && len > window) ? len - window : 0;                   \
            const int64_t n = len - first;                                                            \
            float *qf = (float *)malloc(sizeof(float) * (size_t)g * D);                               \
            float *sc = (float *)malloc(sizeof(float) * (size_t)g * (n > 0 ? n : 1));                 \
            float *acc = (float *)malloc(sizeof(float) * (size_t)g * Dv);                             \
            for (int j = 0; j < g; ++j)                                                               \
                for (int d = 0; d < D; ++d)                                                           \
                    qf[j * D + d] = LOAD(q[((int64_t)r * H + hk * g + j) * D + d]) * scale;           \
            const int64_t *table = tables + (int64_t)r * width;                                       \
            for (int64_t t = 0; t < n; ++t) {                                                         \
                const int64_t pos = first + t;                                                        \
                const T *kp = k_cache + ((table[pos / block_size] * block_size + pos % block_size)     \
                                         * Hkv + hk) * (int64_t)D;                                    \
                float kf[D];                                                                          \
                _Pragma("omp simd")                                                                   \
                for (int d = 0; d < D; ++d) kf[d] = LOAD(kp[d]);                                      \
                for (int j = 0; j < g; ++j) {                                                         \
                    float s = 0.f;                                                                    \
                    const float *qj = qf + j * D;                                                     \
                    _Pragma("omp simd reduction(+ : s)")                                              \
                    for (int d = 0; d < D; ++d) s += qj[d] * kf[d];                                   \
                    sc[j * n + t] = s;                                                                \
                }                                                                                     \
            }                                                                                         \
            for (int j = 0; j < g; ++j) {                                                             \
                float m = -INFINITY, sum = 0.f;                                                       \
                for (int64_t t = 0; t < n; ++t) m = sc[j * n + t] > m ? sc[j * n + t] : m;            \
                for (int64_t t = 0; t < n; ++t) {                                                     \
                    sc[j * n + t] = expf(sc[j * n + t] - m);                                          \
                    sum += sc[j * n + t];                                                             \
                }                                                                                     \
                const float inv = sum > 0.f ? 1.f / sum : 0.f;                                        \
                for (int64_t t = 0; t < n; ++t) sc[j * n + t] *= inv;                                 \
            }                                                                                         \
            memset(acc, 0, sizeof(float) * (size_t)g * Dv);                                           \
            for (int64_t t = 0; t < n; ++t) {                                                         \
                const int64_t pos = first + t;                                                        \
                const T *vp = v_cache + ((table[pos / block_size] * block_size + pos % block_size)     \
                                         * Hkv + hk) * (int64_t)Dv;                                   \
                float vf[Dv];                                                                         \
                _Pragma("omp simd")                                                                   \
                for (int d = 0; d < Dv; ++d) vf[d] = LOAD(vp[d]);                                     \
                for (int j = 0; j < g; ++j) {                                                         \
                    const float p = sc[j * n + t];                                                    \
                    float *aj = acc + j * Dv;                                                         \
                    _Pragma("omp simd")                                                               \
                    for (int d = 0; d < Dv; ++d) aj[d] += p * vf[d];                                  \
                }                                                                                     \
            }                                                                                         \
            for (int j = 0; j < g; ++j)                                                               \
                for (int d = 0; d < Dv; ++d)                                                          \
                    out[((int64_t)r * H + hk * g + j) * Dv + d] = STORE(acc[j * Dv + d]);             \
            free(qf);                                                                                 \
            free(sc);                                                                                 \
            free(acc);                                                                                \
        }                                                                                             \
    }

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)

DEFINE_DECODE(paged_decode_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_DECODE(paged_decode_f32, float, F32_LOAD, F32_STORE)
