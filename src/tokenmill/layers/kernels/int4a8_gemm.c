/* Int4 weights times int8 activations (CPU, AVX512-VNNI): the "w4a8" linear layers.
 *
 * The bf16 int4 kernel (int4_gemv.c) runs at the bf16 dot-product peak of the CPU once a
 * step has a few rows: VDPBF16PS does 32 multiply-adds per instruction. VPDPBUSD does 64
 * (unsigned 8-bit times signed 8-bit, summed in int32), so with the activations rounded
 * to int8 the same work takes about half the instructions. The activations are quantized
 * per row and group of G inputs, symmetrically (x ~ a * xq, xq in [-127, 127],
 * a = max|x| / 127), as llama.cpp does for its 4-bit formats:
 *
 *   y[m, n] = sum_g s[g, n] * a[m, g] * sum_{k in g} (q[n, k] - 8) xq[m, k]
 *           + z[g, n] * sum_{k in g} x[m, k]
 *
 * The integer sums are exact; the zero-point term uses the exact float sum of x.
 *
 * Layout: blocks of 16 output rows, each stored as [Kp / 8][16 rows][4] bytes: byte
 * 4r + j of an 8-column step k holds q[r, k + j] in its low nibble and q[r, k + 4 + j]
 * in its high one. Masking the 64 bytes with 0x0f gives, in 32-bit lane r, the codes of
 * columns k..k+3 of row r; shifting right by 4 first gives columns k+4..k+7.
 *
 * Returns 1 without AVX512-VNNI (the caller keeps its reference path), 2 when the
 * scratch could not be allocated.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define A8_ROWS 16
#define A8_MAX_MB 8
#define A8_PARALLEL_MIN (1 << 15)

static inline float a8_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x (M, K) bf16 -> xq (M, Kp) int8 padded with zeros, a (M, groups) scales, xsum (M,
 * groups) float sums of x, xqsum (M, groups) int32 sums of xq. Exposed so the reference
 * path and the tests quantize exactly as the kernel does. */
void int4a8_quantize_rows(const uint16_t *x, int8_t *xq, float *a, float *xsum, int32_t *xqsum, int64_t M,
                          int64_t K, int64_t G) {
    const int64_t groups = (K + G - 1) / G, Kp = groups * G;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
            float amax = 0.0f, sum = 0.0f;
            for (int64_t k = k0; k < k1; k++) {
                const float f = a8_f32(x[m * K + k]);
                sum += f;
                amax = fabsf(f) > amax ? fabsf(f) : amax;
            }
            const float scale = amax / 127.0f;
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t qs = 0;
            for (int64_t k = k0; k < k0 + G; k++) {
                int32_t q = 0;
                if (k < k1) {
                    q = (int32_t)nearbyintf(a8_f32(x[m * K + k]) * inv);
                    q = q > 127 ? 127 : (q < -127 ? -127 : q);
                }
                xq[m * Kp + k] = (int8_t)q;
                qs += q;
            }
            a[m * groups + g] = scale;
            xsum[m * groups + g] = sum;
            xqsum[m * groups + g] = qs;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)

#define A8_DOT(MB)                                                                                    \
    do {                                                                                              \
        __m512 tot[MB];                                                                               \
        for (int i = 0; i < MB; i++) tot[i] = _mm512_setzero_ps();                                    \
        for (int64_t g = 0; g < groups; g++) {                                                        \
            __m512i acc[MB];                                                                          \
            for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_si512();                             \
            const uint8_t *wg = wb + g * G * (A8_ROWS / 2);                                           \
            _mm_prefetch((const char *)(szp + 2 * ((g + 1) * N + n)), _MM_HINT_T0);                   \
            for (int64_t t = 0; t < G / 8; t++) {                                                     \
                const __m512i c = _mm512_loadu_si512(wg + 64 * t);                                    \
                const __m512i lo = _mm512_and_si512(c, nib);                                          \
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib);                    \
                const int8_t *xk = xq + m0 * Kp + g * G + 8 * t;                                      \
                for (int i = 0; i < MB; i++) {                                                        \
                    int32_t x03, x47;                                                                 \
                    memcpy(&x03, xk + i * Kp, 4);                                                     \
                    memcpy(&x47, xk + i * Kp + 4, 4);                                                 \
                    acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_set1_epi32(x03));                 \
                    acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_set1_epi32(x47));                 \
                }                                                                                     \
            }                                                                                         \
            const __m512i sz = _mm512_maskz_loadu_epi32(live, szp + 2 * (g * N + n));                 \
            const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));                          \
            const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sz, _mm512_set1_epi32((int)0xffff0000))); \
            for (int i = 0; i < MB; i++) {                                                            \
                const int64_t mg = (m0 + i) * groups + g;                                             \
                /* sum (q - 8) xq = sum q xq - 8 sum xq, exact in int32 */                            \
                const __m512i d = _mm512_sub_epi32(acc[i], _mm512_set1_epi32(8 * xqsum[mg]));         \
                const __m512 sa = _mm512_mul_ps(s, _mm512_set1_ps(a[mg]));                            \
                tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sa, tot[i]);                          \
                tot[i] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[mg]), tot[i]);                        \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < MB; i++)                                                                  \
            _mm256_mask_storeu_epi16(y + (m0 + i) * N + n, (__mmask16)live,                           \
                                     (__m256i)_mm512_cvtneps_pbh(tot[i]));                            \
    } while (0)

static void a8_block(const int8_t *xq, const float *a, const float *xsum, const int32_t *xqsum, const uint8_t *w,
                     const uint16_t *szp, uint16_t *y, int64_t M, int64_t N, int64_t Kp, int64_t G, int64_t blk) {
    const int64_t n = blk * A8_ROWS;
    const int64_t groups = Kp / G;
    const __mmask16 live = N - n >= A8_ROWS ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
    const uint8_t *wb = w + blk * Kp * (A8_ROWS / 2);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    int64_t m0 = 0;
    for (; m0 + A8_MAX_MB <= M; m0 += A8_MAX_MB) A8_DOT(A8_MAX_MB);
    switch (M - m0) {
    case 7: A8_DOT(7); break;
    case 6: A8_DOT(6); break;
    case 5: A8_DOT(5); break;
    case 4: A8_DOT(4); break;
    case 3: A8_DOT(3); break;
    case 2: A8_DOT(2); break;
    case 1: A8_DOT(1); break;
    default: break;
    }
}

/* x (M, K) bf16; w the packed codes (ceil(N / 16) blocks of Kp * 8 bytes); sz
 * (ceil(K / G), N, 2) bf16 scales and zeros; y (M, N) bf16. G a multiple of 8. */
int int4a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t G, int nthreads) {
    if (G % 8 || M < 1) return M < 1 ? 0 : 1;
    const int64_t groups = (K + G - 1) / G, Kp = groups * G;
    char *buf = malloc(M * Kp + M * groups * (2 * sizeof(float) + sizeof(int32_t)) + 64);
    if (!buf) return 2;
    float *a = (float *)buf, *xsum = a + M * groups;
    int32_t *xqsum = (int32_t *)(xsum + M * groups);
    int8_t *xq = (int8_t *)(xqsum + M * groups);
    int4a8_quantize_rows(x, xq, a, xsum, xqsum, M, K, G);
    const int64_t blocks = (N + A8_ROWS - 1) / A8_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N * K >= A8_PARALLEL_MIN)
    for (int64_t blk = 0; blk < blocks; blk++) a8_block(xq, a, xsum, xqsum, w, sz, y, M, N, Kp, G, blk);
    free(buf);
    return 0;
}

#else

int int4a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t G, int nthreads) {
    (void)x, (void)w, (void)sz, (void)y, (void)M, (void)N, (void)K, (void)G, (void)nthreads;
    return 1;
}

#endif
