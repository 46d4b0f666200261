/* bfloat16 linear layers for the rows of a decode step (CPU).
 *
 *   y[m, n] = bf16(b[n] + sum_k x[m, k] * w[n, k])      x (M, K), w (N, K), y (M, N)
 *
 * A decode step reads every weight once and waits on memory for it. Each thread takes
 * a contiguous range of blocks of BF16_ROWS weight rows and reads them row after row, so
 * it streams one region of the plain row-major weight sequentially: no copy of the
 * weight in another layout is needed, and a tied embedding can share it. Products are
 * exact (a bf16 times a bf16 fits a float32) and every sum is float32, so the result is
 * F.linear's up to summation order. With AVX512-BF16 one VDPBF16PS multiplies and adds
 * 32 weights; with AVX-512 alone the weights are widened to float32 first.
 *
 * Returns 0, or 1 when this build has no vector path (the caller falls back).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Weight rows per block, the unit of work of the OpenMP loop. */
#define BF16_ROWS 16
/* Most activation rows the streaming GEMV takes; from 5 rows on, the tiled product. */
#define BF16_MAX_M 4
/* Most activation rows and inputs the tiled product takes: past them oneDNN's blocked
 * GEMM is faster (its activations no longer fit the L1 cache next to the weights). */
#define BF16_TILE_MAX_M 64
#define BF16_TILE_MAX_K 2048
/* The tiled product's tile: activation rows by weight rows, one float32 accumulator each. */
#define BF16_TILE_M 4
#define BF16_TILE_N 4
/* Below this many weights the OpenMP team costs more than the second core saves. */
#define BF16_PARALLEL_MIN (1 << 15)

#if defined(__AVX512F__) && defined(__AVX512BW__)

#if defined(__AVX512BF16__)
/* acc += x . w over 32 bfloat16 lanes (pairs summed into 16 float32 lanes). */
#define BF16_MAC(acc, xv, wv) (acc) = _mm512_dpbf16_ps((acc), (__m512bh)(xv), (__m512bh)(wv))
#else
/* Widen the two halves of each 32-bit lane to float32: the low bf16 by a 16-bit shift,
 * the high one by clearing the low half. Same pairing as VDPBF16PS. */
#define BF16_MAC(acc, xv, wv)                                                                   \
    do {                                                                                        \
        const __m512i hi_ = _mm512_set1_epi32((int)0xffff0000);                                 \
        (acc) = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32((xv), 16)),               \
                                _mm512_castsi512_ps(_mm512_slli_epi32((wv), 16)), (acc));       \
        (acc) = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512((xv), hi_)),               \
                                _mm512_castsi512_ps(_mm512_and_si512((wv), hi_)), (acc));       \
    } while (0)
#endif

/* Rows 0 .. MB - 1 of x against the block's weight rows, one weight row after another:
 * the thread reads a single sequential stream, which the hardware prefetchers follow at
 * about 1.5x the speed of BF16_ROWS interleaved row streams (measured: 38-42 GB/s on one
 * core against 24-32). Two accumulators per activation row hide the VDPBF16PS latency;
 * the activations come from L1. */
#define BF16_ROW(MB)                                                                               \
    do {                                                                                           \
        for (int r = 0; r < rows; r++) {                                                           \
            const uint16_t *wr = wn + r * K;                                                       \
            __m512 a0[MB], a1[MB];                                                                 \
            for (int i = 0; i < MB; i++) a0[i] = a1[i] = _mm512_setzero_ps();                      \
            int64_t k = 0;                                                                         \
            for (; k + 64 <= K; k += 64) {                                                         \
                const __m512i w0 = _mm512_loadu_si512(wr + k), w1 = _mm512_loadu_si512(wr + k + 32); \
                for (int i = 0; i < MB; i++) {                                                     \
                    BF16_MAC(a0[i], _mm512_loadu_si512(x + i * K + k), w0);                        \
                    BF16_MAC(a1[i], _mm512_loadu_si512(x + i * K + k + 32), w1);                   \
                }                                                                                  \
            }                                                                                      \
            if (k + 32 <= K) {                                                                     \
                const __m512i w0 = _mm512_loadu_si512(wr + k);                                     \
                for (int i = 0; i < MB; i++) BF16_MAC(a0[i], _mm512_loadu_si512(x + i * K + k), w0); \
                k += 32;                                                                           \
            }                                                                                      \
            if (k < K) { /* the last K % 32 columns, masked: the lanes past K read as zeros */     \
                const __m512i w1 = _mm512_maskz_loadu_epi16(tail, wr + k);                         \
                for (int i = 0; i < MB; i++)                                                       \
                    BF16_MAC(a1[i], _mm512_maskz_loadu_epi16(tail, x + i * K + k), w1);            \
            }                                                                                      \
            const float bias = b ? bf16_to_f32(b[n + r]) : 0.0f;                                    \
            for (int i = 0; i < MB; i++)                                                           \
                y[i * N + n + r] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i])) + bias); \
        }                                                                                          \
    } while (0)

static void bf16_block(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M,
                       int64_t N, int64_t K, int64_t blk) {
    const int64_t n = blk * BF16_ROWS;
    const int rows = N - n < BF16_ROWS ? (int)(N - n) : BF16_ROWS; /* the last block may be short */
    const uint16_t *wn = w + n * K;
    const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
    switch (M) {
    case 4: BF16_ROW(4); break;
    case 3: BF16_ROW(3); break;
    case 2: BF16_ROW(2); break;
    default: BF16_ROW(1); break;
    }
}

/* The tiled product for 5 to BF16_TILE_MAX_M rows: a tile of MB activation rows by
 * BF16_TILE_N weight rows keeps one accumulator per output, so each weight load serves
 * MB products and each activation load BF16_TILE_N (half a load per VDPBF16PS, against
 * 1.25 in the streaming loop). Every output sums its 32-lane chunks in k order into one
 * accumulator and then its lanes, whatever the tile it falls in: a row's result does not
 * depend on the other rows of the call. The weight rows BF16_TILE_N ahead are prefetched
 * while a tile computes (measured on 30 SmolLM2-sized layers, weights from memory:
 * 1.2-1.3x oneDNN's packed GEMM at 5-16 rows, 1.1x at 32, 0.9x at 64). */
#define BF16_TILE(MB)                                                                              \
    do {                                                                                           \
        __m512 acc[MB][BF16_TILE_N];                                                               \
        for (int i = 0; i < MB; i++)                                                               \
            for (int j = 0; j < BF16_TILE_N; j++) acc[i][j] = _mm512_setzero_ps();                 \
        int64_t k = 0;                                                                             \
        for (; k + 32 <= K; k += 32) {                                                             \
            __m512i wv[BF16_TILE_N];                                                               \
            for (int j = 0; j < BF16_TILE_N; j++) {                                                \
                wv[j] = _mm512_loadu_si512(wr[j] + k);                                             \
                _mm_prefetch((const char *)(wr[j] + BF16_TILE_N * K + k), _MM_HINT_T0);            \
            }                                                                                      \
            for (int i = 0; i < MB; i++) {                                                         \
                const __m512i xv = _mm512_loadu_si512(xm + i * K + k);                             \
                for (int j = 0; j < BF16_TILE_N; j++) BF16_MAC(acc[i][j], xv, wv[j]);              \
            }                                                                                      \
        }                                                                                          \
        if (k < K) { /* the last K % 32 columns, masked: the lanes past K read as zeros */         \
            __m512i wv[BF16_TILE_N];                                                               \
            for (int j = 0; j < BF16_TILE_N; j++) wv[j] = _mm512_maskz_loadu_epi16(tail, wr[j] + k); \
            for (int i = 0; i < MB; i++) {                                                         \
                const __m512i xv = _mm512_maskz_loadu_epi16(tail, xm + i * K + k);                 \
                for (int j = 0; j < BF16_TILE_N; j++) BF16_MAC(acc[i][j], xv, wv[j]);              \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MB; i++)                                                               \
            for (int j = 0; j < nw; j++)                                                           \
                y[(m0 + i) * N + n + j] =                                                          \
                    f32_to_bf16(_mm512_reduce_add_ps(acc[i][j]) + (b ? bf16_to_f32(b[n + j]) : 0.0f)); \
    } while (0)

static void bf16_tile_block(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M,
                            int64_t N, int64_t K, int64_t blk) {
    const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
    const int64_t end = (blk + 1) * BF16_ROWS < N ? (blk + 1) * BF16_ROWS : N;
    for (int64_t n = blk * BF16_ROWS; n < end; n += BF16_TILE_N) {
        const int nw = end - n < BF16_TILE_N ? (int)(end - n) : BF16_TILE_N;
        /* past the last weight row, repeat it: computed, never stored */
        const uint16_t *wr[BF16_TILE_N];
        for (int j = 0; j < BF16_TILE_N; j++) wr[j] = w + (n + (j < nw ? j : nw - 1)) * K;
        for (int64_t m0 = 0; m0 < M; m0 += BF16_TILE_M) {
            const uint16_t *xm = x + m0 * K;
            switch (M - m0 < BF16_TILE_M ? M - m0 : BF16_TILE_M) {
            case 4: BF16_TILE(4); break;
            case 3: BF16_TILE(3); break;
            case 2: BF16_TILE(2); break;
            default: BF16_TILE(1); break;
            }
        }
    }
}

/* x (M, K), w (N, K), b (N,) or NULL, y (M, N): all bfloat16, contiguous. 1 to
 * BF16_MAX_M rows stream the weight; up to BF16_TILE_MAX_M rows (with K up to
 * BF16_TILE_MAX_K) take the tiled product. */
int bf16_gemv(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M, int64_t N,
              int64_t K, int nthreads) {
    const int tiled = M > BF16_MAX_M;
    if (M < 1 || M > BF16_TILE_MAX_M || (tiled && K > BF16_TILE_MAX_K)) return 1;
    const int64_t blocks = (N + BF16_ROWS - 1) / BF16_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= BF16_PARALLEL_MIN)
    for (int64_t blk = 0; blk < blocks; blk++) {
        if (tiled)
            bf16_tile_block(x, w, b, y, M, N, K, blk);
        else
            bf16_block(x, w, b, y, M, N, K, blk);
    }
    return 0;
}

#else

int bf16_gemv(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M, int64_t N,
              int64_t K, int nthreads) {
    (void)x, (void)w, (void)b, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 1;
}

#endif
