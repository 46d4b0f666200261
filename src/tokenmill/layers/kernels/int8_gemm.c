/* Int8 weight-only linear layers with bfloat16 activations (CPU): the "int8" mode.
 *
 *   y[m, n] = bf16(s[n] * sum_k q[n, k] x[m, k] + b[n]),   q in [-127, 127]
 *
 * The weights stay 8-bit in memory, half of bf16's bytes, which is what a decode step
 * waits on. Output rows are taken I8_ROWS = 16 at a time, one per float32 lane. A block's
 * codes are stored as [Kp / 2][16 rows][2] bytes (Kp = K rounded up to even): the 32
 * bytes of a step sign-extend to 32-bit integers, convert to float and narrow to bf16
 * (all exact: |q| <= 127), giving in lane r the pair (q[r, k], q[r, k + 1]) that
 * VDPBF16PS multiplies by the broadcast activation pair (x[k], x[k + 1]). Products are
 * exact in float32 and every sum is float32, so the result is the dequantized layer's
 * up to summation order, a fused multiply-add of scale and bias, and the rounding to
 * bf16. (VDPBF16PS treats bf16 denormals as zero.) With more than I8_MAX_MB rows, each block
 * is widened to bf16 once into a per-thread scratch and read from there by every chunk
 * of rows.
 *
 * Needs AVX512-BF16; returns 1 without it (the caller keeps PyTorch's path), 2 when the
 * scratch could not be allocated.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define I8_ROWS 16
/* Activation rows whose accumulators stay in registers over a pass of a block. */
#define I8_MAX_MB 8
#define I8_PARALLEL_MIN (1 << 15)
#define I8_CHUNK_BYTES (256 << 10)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)

/* The 32 codes at p (16 rows x a pair of columns) as 32 bf16 values, in order. */
static inline __m512i i8_widen(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Rows m0 .. m0 + MB - 1 of the padded activations xs (rows Kp apart) against one block:
 * its codes wb, or its bf16 values wf when the block was widened already. */
#define I8_DOT(MB)                                                                                    \
    do {                                                                                              \
        __m512 acc[MB];                                                                               \
        for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();                                    \
        const uint16_t *xk = xs + m0 * Kp;                                                            \
        for (int64_t t = 0; t < Kp / 2; t++) {                                                        \
            __m512i w2;                                                                               \
            if (wf) {                                                                                 \
                w2 = _mm512_loadu_si512(wf + 32 * t);                                                 \
            } else {                                                                                  \
                _mm_prefetch((const char *)(wb + 32 * t + Kp * I8_ROWS), _MM_HINT_T0);                \
                w2 = i8_widen(wb + 32 * t);                                                           \
            }                                                                                         \
            for (int i = 0; i < MB; i++) {                                                            \
                int32_t pair;                                                                         \
                memcpy(&pair, xk + i * Kp + 2 * t, 4);                                                \
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)w2);    \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < MB; i++) {                                                                \
            const __m512 r = _mm512_fmadd_ps(acc[i], s, b);                                           \
            _mm256_mask_storeu_epi16(y + (m0 + i) * N + n, (__mmask16)live, (__m256i)_mm512_cvtneps_pbh(r)); \
        }                                                                                             \
    } while (0)

static void i8_block(const uint16_t *xs, const int8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                     int64_t M, int64_t N, int64_t Kp, int64_t blk, uint16_t *scratch) {
    const int64_t n = blk * I8_ROWS;
    const __mmask16 live = N - n >= I8_ROWS ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
    const int8_t *wb = w + blk * Kp * I8_ROWS;
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, scales + n)), 16));
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, bias + n)), 16))
                          : _mm512_setzero_ps();
    const uint16_t *wf = NULL;
    if (M > I8_MAX_MB && scratch) { /* widen once, read by every chunk of rows */
        for (int64_t t = 0; t < Kp / 2; t++) _mm512_storeu_si512(scratch + 32 * t, i8_widen(wb + 32 * t));
        wf = scratch;
    }
    int64_t m0 = 0;
    /* From the widened block, 16 rows at a time: twice the independent accumulators. */
    if (wf)
        for (; m0 + 2 * I8_MAX_MB <= M; m0 += 2 * I8_MAX_MB) I8_DOT(2 * I8_MAX_MB);
    for (; m0 + I8_MAX_MB <= M; m0 += I8_MAX_MB) I8_DOT(I8_MAX_MB);
    switch (M - m0) {
    case 7: I8_DOT(7); break;
    case 6: I8_DOT(6); break;
    case 5: I8_DOT(5); break;
    case 4: I8_DOT(4); break;
    case 3: I8_DOT(3); break;
    case 2: I8_DOT(2); break;
    case 1: I8_DOT(1); break;
    default: break;
    }
}

/* x (M, K) bf16; w the packed codes of an (N, K) weight, ceil(N / 16) blocks of Kp * 16
 * bytes; scales (N,) bf16; bias (N,) bf16 or NULL; y (M, N) bf16. */
int int8_gemm_bf16(const uint16_t *x, const int8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                   int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M < 1) return 0;
    const int64_t Kp = (K + 1) / 2 * 2, blocks = (N + I8_ROWS - 1) / I8_ROWS;
    const int team = M * N * K >= I8_PARALLEL_MIN ? (nthreads > 0 ? nthreads : 1) : 1;
    /* for odd K the activations padded to Kp, then per thread one widened block */
    const int64_t xbytes = Kp > K ? (M * Kp * (int64_t)sizeof(uint16_t) + 63) / 64 * 64 : 0;
    const int64_t wbytes = M > I8_MAX_MB ? Kp * I8_ROWS * (int64_t)sizeof(uint16_t) : 0;
    char *buf = aligned_alloc(64, xbytes + team * wbytes + 64);
    if (!buf) return 2;
    /* odd K: the activations padded to Kp (a pair is read whole); else read in place */
    const uint16_t *xs = Kp > K ? (const uint16_t *)buf : x;
    int64_t chunk = (I8_CHUNK_BYTES / (Kp * (int64_t)sizeof(uint16_t))) / I8_MAX_MB * I8_MAX_MB;
    chunk = chunk < I8_MAX_MB ? I8_MAX_MB : chunk;
#pragma omp parallel num_threads(team)
    {
        uint16_t *scratch = wbytes ? (uint16_t *)(buf + xbytes + omp_get_thread_num() * wbytes) : NULL;
        if (Kp > K) {
            uint16_t *pad = (uint16_t *)buf;
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {
                memcpy(pad + m * Kp, x + m * K, K * sizeof(uint16_t));
                pad[m * Kp + K] = 0;
            }
        }
        /* Rows in chunks whose activations stay in L2 while every block passes over them. */
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            const int64_t rows = M - m0 < chunk ? M - m0 : chunk;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; blk++)
                i8_block(xs + m0 * Kp, w, scales, bias, y + m0 * N, rows, N, Kp, blk, scratch);
        }
    }
    free(buf);
    return 0;
}

#else

int int8_gemm_bf16(const uint16_t *x, const int8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                   int64_t M, int64_t N, int64_t K, int nthreads) {
    (void)x, (void)w, (void)scales, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)nthreads;
    return 1;
}

#endif
