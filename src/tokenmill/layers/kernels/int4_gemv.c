/* Int4 weight-only linear layers with bfloat16 activations (CPU).
 *
 *   y[m, n] = bf16(sum_k x[m, k] * ((q[n, k] - 8) * s[g, n] + z[g, n])),   g = k / G
 *           = bf16(sum_g s[g, n] * sum_{k in g} q[n, k] x[m, k] + (z[g, n] - 8 s[g, n]) * sum_{k in g} x[m, k])
 *
 * The codes stay 4-bit in memory. Output rows are taken I4_ROWS = 16 at a time, one per
 * float32 lane, so no horizontal sums are needed. A block's codes are stored as
 * [Kp / 4][16 rows][2] bytes: byte 2r + j of a 4-column step k holds q[r, k + j] in its
 * low nibble and q[r, k + 2 + j] in its high one. Zero-extending the 32 bytes to 16-bit
 * words and looking each nibble up in a table of the 16 bfloat16 values 0..15 gives,
 * in 32-bit lane r, the bf16 pairs (q[r, k], q[r, k + 1]) and (q[r, k + 2], q[r, k + 3]),
 * which VDPBF16PS multiplies by the broadcast activation pairs (x[k], x[k + 1]) and
 * (x[k + 2], x[k + 3]). Codes and activations are exact in bf16 and their products exact
 * in float32; every sum is float32, so the result is the dequantized layer's up to
 * summation order. Scales and zeros are read in the layer's own (K / G, N, 2) layout.
 *
 * Needs AVX512-BF16; returns 1 without it (the caller keeps PyTorch's kernel), 2 when
 * the scratch could not be allocated.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define I4_ROWS 16
/* Activation rows per pass over a block's codes: the accumulators of this many rows stay
 * in registers, and each code is unpacked once per pass. */
#define I4_MAX_MB 8
#define I4_PARALLEL_MIN (1 << 15)
#define I4_CHUNK_BYTES (256 << 10)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)

/* Rows m0 .. m0 + MB - 1 of the padded activations against block `blk`. */
#define I4_DOT(MB)                                                                                    \
    do {                                                                                              \
        __m512 tot[MB];                                                                               \
        for (int i = 0; i < MB; i++) tot[i] = _mm512_setzero_ps();                                    \
        for (int64_t g = 0; g < groups; g++) {                                                        \
            __m512 acc[MB];                                                                           \
            for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();                                \
            const uint8_t *wg = wb + g * G * (I4_ROWS / 2);                                           \
            /* the scales are a strided stream the prefetchers miss: ask for the next group's */      \
            _mm_prefetch((const char *)(szp + 2 * ((g + 1) * N + n)), _MM_HINT_T0);                   \
            for (int64_t t = 0; t < G / 4; t++) {                                                     \
                /* the same bytes of the next block: memory streams while this one computes */       \
                _mm_prefetch((const char *)(wg + 32 * t + Kp * (I4_ROWS / 2)), _MM_HINT_T0);          \
                const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wg + 32 * t))); \
                /* the table repeats every 16 entries, so bits 4+ of the low nibble's index are ignored */ \
                const __m512i lo = _mm512_permutexvar_epi16(c, table);                                \
                const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), table);          \
                const uint16_t *xk = xs + m0 * Kp + g * G + 4 * t;                                    \
                for (int i = 0; i < MB; i++) {                                                        \
                    int32_t x01, x23;                                                                 \
                    memcpy(&x01, xk + i * Kp, 4);                                                     \
                    memcpy(&x23, xk + i * Kp + 2, 4);                                                 \
                    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(x01), (__m512bh)lo); \
                    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(x23), (__m512bh)hi); \
                }                                                                                     \
            }                                                                                         \
            /* (s, z) bf16 pairs of the block's rows: s is the low half of each 32-bit lane */        \
            const __m512i sz = _mm512_maskz_loadu_epi32(live, szp + 2 * (g * N + n));                 \
            const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));                          \
            const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sz, _mm512_set1_epi32((int)0xffff0000))); \
            const __m512 cz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z); /* z - 8 s */            \
            for (int i = 0; i < MB; i++) {                                                            \
                tot[i] = _mm512_fmadd_ps(acc[i], s, tot[i]);                                          \
                tot[i] = _mm512_fmadd_ps(cz, _mm512_set1_ps(xsum[(m0 + i) * groups + g]), tot[i]);    \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < MB; i++)                                                                  \
            _mm256_mask_storeu_epi16(y + (m0 + i) * N + n, (__mmask16)live,                           \
                                     (__m256i)_mm512_cvtneps_pbh(tot[i]));                            \
    } while (0)

static void i4_block(const uint16_t *xs, const float *xsum, const uint8_t *w, const uint16_t *szp, uint16_t *y,
                     int64_t M, int64_t N, int64_t Kp, int64_t G, int64_t blk, __m512i table) {
    const int64_t n = blk * I4_ROWS;
    const int64_t groups = Kp / G;
    const __mmask16 live = N - n >= I4_ROWS ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
    const uint8_t *wb = w + blk * Kp * (I4_ROWS / 2);
    int64_t m0 = 0;
    for (; m0 + I4_MAX_MB <= M; m0 += I4_MAX_MB) I4_DOT(I4_MAX_MB);
    switch (M - m0) {
    case 7: I4_DOT(7); break;
    case 6: I4_DOT(6); break;
    case 5: I4_DOT(5); break;
    case 4: I4_DOT(4); break;
    case 3: I4_DOT(3); break;
    case 2: I4_DOT(2); break;
    case 1: I4_DOT(1); break;
    default: break;
    }
}

/* x (M, K) bf16; w the packed codes of an (N, K) weight, ceil(N / 16) blocks of
 * Kp * 8 bytes with Kp = ceil(K / G) * G; sz (ceil(K / G), N, 2) bf16 scales and zeros;
 * y (M, N) bf16. G a multiple of 4. */
int int4_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                   int64_t K, int64_t G, int nthreads) {
    if (G % 4 || M < 1) return M < 1 ? 0 : 1;
    const int64_t groups = (K + G - 1) / G, Kp = groups * G;
    /* The activations padded with zeros to whole groups, and each group's sum. */
    uint16_t *xs = malloc(M * Kp * sizeof(uint16_t) + M * groups * sizeof(float));
    if (!xs) return 2;
    float *xsum = (float *)(xs + M * Kp);
    /* Sixteen at a time where the groups allow (a scalar chain of float adds was a tenth of
     * a 64-row step); the order of this sum only affects the zero-point term. */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        memcpy(xs + m * Kp, x + m * K, K * sizeof(uint16_t));
        memset(xs + m * Kp + K, 0, (Kp - K) * sizeof(uint16_t));
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xg = xs + m * Kp + g * G;
            float acc = 0.0f;
            if (G % 16 == 0) {
                __m512 v = _mm512_setzero_ps();
                for (int64_t k = 0; k < G; k += 16)
                    v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                                             _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xg + k))), 16)));
                acc = _mm512_reduce_add_ps(v);
            } else {
                for (int64_t k = 0; k < G; k++) {
                    const uint32_t u = (uint32_t)xg[k] << 16;
                    float f;
                    memcpy(&f, &u, 4);
                    acc += f;
                }
            }
            xsum[m * groups + g] = acc;
        }
    }
    uint16_t tab[32];
    for (int i = 0; i < 32; i++) {
        const float f = (float)(i & 15);
        uint32_t u;
        memcpy(&u, &f, 4);
        tab[i] = (uint16_t)(u >> 16); /* exact: small integers are bf16 values */
    }
    const __m512i table = _mm512_loadu_si512(tab);
    const int64_t blocks = (N + I4_ROWS - 1) / I4_ROWS;
    /* Rows in chunks whose activations stay in L2 while every block of codes passes over
     * them: a prompt's thousands of rows would otherwise stream from L3 once per block. */
    int64_t chunk = (I4_CHUNK_BYTES / (Kp * (int64_t)sizeof(uint16_t))) / I4_MAX_MB * I4_MAX_MB;
    chunk = chunk < I4_MAX_MB ? I4_MAX_MB : chunk;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t rows = M - m0 < chunk ? M - m0 : chunk;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * N * K >= I4_PARALLEL_MIN)
        for (int64_t blk = 0; blk < blocks; blk++)
            i4_block(xs + m0 * Kp, xsum + m0 * groups, w, sz, y + m0 * N, rows, N, Kp, G, blk, table);
    }
    free(xs);
    return 0;
}

#else

int int4_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                   int64_t K, int64_t G, int nthreads) {
    (void)x, (void)w, (void)sz, (void)y, (void)M, (void)N, (void)K, (void)G, (void)nthreads;
    return 1;
}

#endif
