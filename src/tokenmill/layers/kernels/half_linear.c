/* Float32 linear layers whose weights are stored as IEEE float16.
 *
 *   y[m, n] = b[n] + sum_k x[m, k] * w[n, k]
 *
 * Every product and sum is float32: a half weight widens to float32 exactly (F16C), so
 * the result is the float32 layer's up to summation order. The weights stream from
 * memory at half the bytes, which is what a decode step of a few rows waits for.
 * Weights that came from a float16 checkpoint (Whisper's CTranslate2 files) lose nothing.
 *
 * Returns 0, or 1 when this build has no vector path for the shape (the caller falls
 * back to the float32 weight).
 */
#include <immintrin.h>
#include <stdint.h>

/* Below this many weights the OpenMP team costs more than the second core saves. */
#define HALF_PARALLEL_MIN (1 << 15)
/* Weight rows per block. The copy is stored block after block, each block as
 * [K / 16][HALF_ROWS][16] halves: the kernel then reads one sequential stream, which the
 * hardware prefetchers follow at about three times the speed of four row streams. */
#define HALF_ROWS 4

#if defined(__AVX512F__)

/* Rows m0 .. m0 + MB - 1 of x against the HALF_ROWS weight rows of block `blk`. */
#define HALF_DOT(MB)                                                                        \
    do {                                                                                    \
        __m512 acc[MB][HALF_ROWS];                                                          \
        for (int i = 0; i < MB; i++)                                                        \
            for (int r = 0; r < HALF_ROWS; r++) acc[i][r] = _mm512_setzero_ps();            \
        for (int64_t k = 0; k < K; k += 16) {                                               \
            const uint16_t *wk = wb + k * HALF_ROWS;                                        \
            __m512 wv[HALF_ROWS];                                                           \
            for (int r = 0; r < HALF_ROWS; r++)                                             \
                wv[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wk + 16 * r))); \
            for (int i = 0; i < MB; i++) {                                                  \
                const __m512 xv = _mm512_loadu_ps(x + (m0 + i) * K + k);                    \
                for (int r = 0; r < HALF_ROWS; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]); \
            }                                                                               \
        }                                                                                   \
        for (int i = 0; i < MB; i++)                                                        \
            for (int r = 0; r < rows; r++)                                                  \
                y[(m0 + i) * N + n + r] = _mm512_reduce_add_ps(acc[i][r]) + (b ? b[n + r] : 0.0f); \
    } while (0)

static void half_block(const float *x, const uint16_t *w, const float *b, float *y, int64_t M, int64_t N,
                       int64_t K, int64_t blk) {
    const int64_t n = blk * HALF_ROWS;
    const int rows = N - n < HALF_ROWS ? (int)(N - n) : HALF_ROWS; /* the last block may be short */
    const uint16_t *wb = w + n * K;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) HALF_DOT(4);
    switch (M - m0) {
    case 3: HALF_DOT(3); break;
    case 2: HALF_DOT(2); break;
    case 1: HALF_DOT(1); break;
    default: break;
    }
}

/* w: the blocked copy of an (N, K) weight, ceil(N / HALF_ROWS) * HALF_ROWS rows (the
 * padding rows are zeros and never written out). */
int half_linear_f32(const float *x, const uint16_t *w, const float *b, float *y, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    if (K % 16 != 0) return 1;
    const int64_t blocks = (N + HALF_ROWS - 1) / HALF_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= HALF_PARALLEL_MIN)
    for (int64_t blk = 0; blk < blocks; blk++) half_block(x, w, b, y, M, N, K, blk);
    return 0;
}

/* dst = float16(src), rounded to nearest. Returns 1 when a value changed in the rounding
 * (or is NaN), 0 when every value is exactly a float16 one: one pass over the weights
 * instead of PyTorch's convert, widen and compare. */
int half_from_f32(const float *src, uint16_t *dst, int64_t n, int nthreads) {
    int inexact = 0;
    const int64_t blocks = n / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : inexact) if (n >= HALF_PARALLEL_MIN)
    for (int64_t i = 0; i < blocks; i++) {
        const __m512 v = _mm512_loadu_ps(src + 16 * i);
        const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256((__m256i *)(dst + 16 * i), h);
        inexact |= _mm512_cmp_ps_mask(_mm512_cvtph_ps(h), v, _CMP_NEQ_UQ) != 0;
    }
    for (int64_t i = 16 * blocks; i < n; i++) {
        const uint16_t h = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
        dst[i] = h;
        const float back = _cvtsh_ss(h);
        inexact |= !(back == src[i]);
    }
    return inexact;
}

#else

int half_from_f32(const float *src, uint16_t *dst, int64_t n, int nthreads) {
    (void)src, (void)dst, (void)n, (void)nthreads;
    return -1;
}

int half_linear_f32(const float *x, const uint16_t *w, const float *b, float *y, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    (void)x, (void)w, (void)b, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 1;
}

#endif
