/* Int4 weights times int8 activations (CPU, AVX512-VNNI and AVX512-BF16): the "w4a8" linear layers.
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
 * int8a8_gemm_bf16 does the same for int8 weights with one scale per output (the "w8a8"
 * layers), y[m, n] = s[n] * sum_g a[m, g] * sum_{k in g} q[n, k] xq[m, k] + b[n], the codes
 * stored as u = q + 128 so that VPDPBUSD can take them: [Kp / 4][16 rows][4] bytes per
 * block, so that of each 8-column step the first 64 bytes hold columns k..k+3 of every
 * row and the next 64 columns k+4..k+7. The - 128 sum xq that the offset adds seeds the integer sums.
 *
 * Returns 1 without AVX512-VNNI and AVX512-BF16 (the caller keeps its reference path), 2
 * when the scratch could not be allocated.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define A8_ROWS 16
#define A8_MAX_MB 8
#define A8_PARALLEL_MIN (1 << 15)
#define A8_CHUNK_BYTES (256 << 10)


/* One row of x (K bf16) -> its int8 codes (Kp, padded with zeros), and per group the scale
 * a = max|x| / 127, the float sum of x and the int32 sum of the codes. Scalar version. */
static void a8_quantize_row_scalar(const uint16_t *x, int8_t *xq, float *a, float *xsum, int32_t *xqsum, int64_t K,
                                   int64_t G) {
    const int64_t groups = (K + G - 1) / G;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        float amax = 0.0f, sum = 0.0f;
        for (int64_t k = k0; k < k1; k++) {
            const float f = bf16_to_f32(x[k]);
            sum += f;
            amax = fabsf(f) > amax ? fabsf(f) : amax;
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        if (isinf(inv)) inv = 0.0f; /* max|x| below 127 / FLT_MAX: every code rounds to 0 */
        int32_t qs = 0;
        for (int64_t k = k0; k < k0 + G; k++) {
            int32_t q = 0;
            if (k < k1) {
                q = (int32_t)nearbyintf(bf16_to_f32(x[k]) * inv);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
            }
            xq[k] = (int8_t)q;
            qs += q;
        }
        a[g] = amax / 127.0f;
        xsum[g] = sum;
        xqsum[g] = qs;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same with AVX-512, 16 inputs at a time (G a multiple of 16): the codes are the same
 * (x * (127 / max|x|) rounded half to even, as nearbyintf does); the float sum of x is
 * added in another order, which only the zero-point term sees. */
static void a8_quantize_row(const uint16_t *x, int8_t *xq, float *a, float *xsum, int32_t *xqsum, int64_t K,
                            int64_t G) {
    if (G % 16 || G > 256) { /* v[] holds at most 256 inputs */
        a8_quantize_row_scalar(x, xq, a, xsum, xqsum, K, G);
        return;
    }
    const int64_t groups = (K + G - 1) / G;
    __m512 v[256 / 16];
    for (int64_t g = 0; g < groups; g++) {
        const int64_t k0 = g * G, nch = G / 16;
        __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
        for (int64_t c = 0; c < nch; c++) {
            const int64_t left = K - (k0 + 16 * c);
            const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
            const __m256i h = _mm256_maskz_loadu_epi16(mk, x + k0 + 16 * c);
            v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v[c]));
            vsum = _mm512_add_ps(vsum, v[c]);
        }
        const float amax = _mm512_reduce_max_ps(vmax);
        const float inv1 = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512 inv = _mm512_set1_ps(isinf(inv1) ? 0.0f : inv1); /* as in the scalar version */
        __m512i qsum = _mm512_setzero_si512();
        for (int64_t c = 0; c < nch; c++) {
            const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v[c], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i q = _mm512_cvtps_epi32(r);
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_storeu_si128((__m128i *)(xq + k0 + 16 * c), _mm512_cvtepi32_epi8(q));
            qsum = _mm512_add_epi32(qsum, q);
        }
        a[g] = amax / 127.0f;
        xsum[g] = _mm512_reduce_add_ps(vsum);
        xqsum[g] = _mm512_reduce_add_epi32(qsum);
    }
}
#else
#define a8_quantize_row a8_quantize_row_scalar
#endif

/* x (M, K) bf16 -> xq (M, Kp) int8 padded with zeros, a (M, groups) scales, xsum (M,
 * groups) float sums of x, xqsum (M, groups) int32 sums of xq. Exposed so the tests can
 * check the codes against the reference path's rounding. */
void int4a8_quantize_rows(const uint16_t *x, int8_t *xq, float *a, float *xsum, int32_t *xqsum, int64_t M,
                          int64_t K, int64_t G, int nthreads) {
    const int64_t groups = (K + G - 1) / G, Kp = groups * G;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= (1 << 16) && G <= 256)
    for (int64_t m = 0; m < M; m++)
        a8_quantize_row(x + m * K, xq + m * Kp, a + m * groups, xsum + m * groups, xqsum + m * groups, K, G);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)

/* acc += a (unsigned bytes) . the 4 signed bytes at p, broadcast. GCC 12 compiles the
 * intrinsic with a separate broadcast and a register copy per accumulator (VPDPBUSD
 * overwrites its accumulator); written out, the broadcast is the instruction's memory
 * operand and the accumulators stay put. */
static inline __attribute__((always_inline)) __m512i a8_dpbusd(__m512i acc, __m512i a, const int32_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*p));
    return acc;
}

/* The activations of a chunk of up to A8_MAX_MB rows, interleaved so that one pointer
 * walks them all: codes as [Kp / 8][mb][8] (the 8 codes of one column step of each row
 * side by side), and per group the rows' scales a, float sums of x and -8 x the code sums
 * as [groups][mb]. With one base pointer and constant offsets, every activation broadcast
 * is an operand of its VPDPBUSD (no row pointers spilled), and the weights' zero offset
 * (-8 sum xq) seeds the integer accumulator instead of costing a subtraction per group.
 * With a8_dpbusd: 30 SmolLM2 layers 1.09x faster at 64 rows, 1.05-1.08x at 512, the
 * 49152-output LM head 1.13x at 64 rows; the same bits. */
typedef struct {
    const int8_t *xq;
    const float *a, *xsum;
    const int32_t *neg8;
} a8_chunk;

#define A8_DOT(MB)                                                                                    \
    do {                                                                                              \
        __m512 tot[MB];                                                                               \
        for (int i = 0; i < MB; i++) tot[i] = _mm512_setzero_ps();                                    \
        const int32_t *xs = (const int32_t *)ch->xq;                                                  \
        for (int64_t g = 0; g < groups; g++) {                                                        \
            __m512i acc[MB];                                                                          \
            /* sum (q - 8) xq = sum q xq - 8 sum xq, exact in int32 */                                \
            for (int i = 0; i < MB; i++) acc[i] = _mm512_set1_epi32(ch->neg8[g * MB + i]);            \
            const uint8_t *wg = wb + g * G * (A8_ROWS / 2);                                           \
            _mm_prefetch((const char *)(szp + 2 * ((g + 1) * N + n)), _MM_HINT_T0);                   \
            for (int64_t t = 0; t < G / 8; t++, xs += 2 * MB) {                                       \
                /* the same line of the next block: memory streams while this one computes */       \
                _mm_prefetch((const char *)(wg + 64 * t + Kp * (A8_ROWS / 2)), _MM_HINT_T0);          \
                const __m512i c = _mm512_loadu_si512(wg + 64 * t);                                    \
                const __m512i lo = _mm512_and_si512(c, nib);                                          \
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib);                    \
                for (int i = 0; i < MB; i++) {                                                        \
                    acc[i] = a8_dpbusd(acc[i], lo, xs + 2 * i);                                       \
                    acc[i] = a8_dpbusd(acc[i], hi, xs + 2 * i + 1);                                   \
                }                                                                                     \
            }                                                                                         \
            const __m512i sz = _mm512_maskz_loadu_epi32(live, szp + 2 * (g * N + n));                 \
            const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));                          \
            const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sz, _mm512_set1_epi32((int)0xffff0000))); \
            for (int i = 0; i < MB; i++) {                                                            \
                const __m512 sa = _mm512_mul_ps(s, _mm512_set1_ps(ch->a[g * MB + i]));                \
                tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), sa, tot[i]);                     \
                tot[i] = _mm512_fmadd_ps(z, _mm512_set1_ps(ch->xsum[g * MB + i]), tot[i]);            \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < MB; i++)                                                                  \
            _mm256_mask_storeu_epi16(y + (m0 + i) * N + n, (__mmask16)live,                           \
                                     (__m256i)_mm512_cvtneps_pbh(tot[i]));                            \
    } while (0)

/* DOT(MB) over the chunks [c0, c1), MB each chunk's rows (A8_MAX_MB but in the last). */
#define A8_EACH_CHUNK(DOT)                                                                            \
    for (int64_t c = c0; c < c1; c++) {                                                               \
        const a8_chunk *ch = &chunks[c];                                                              \
        const int64_t m0 = c * A8_MAX_MB;                                                             \
        switch (M - m0 < A8_MAX_MB ? M - m0 : A8_MAX_MB) {                                            \
        case 8: DOT(8); break;                                                                        \
        case 7: DOT(7); break;                                                                        \
        case 6: DOT(6); break;                                                                        \
        case 5: DOT(5); break;                                                                        \
        case 4: DOT(4); break;                                                                        \
        case 3: DOT(3); break;                                                                        \
        case 2: DOT(2); break;                                                                        \
        default: DOT(1); break;                                                                       \
        }                                                                                             \
    }

/* One block of 16 outputs for the rows of chunks [c0, c1) (chunk c holds rows 8c..). */
static void a8_block(const a8_chunk *chunks, int64_t c0, int64_t c1, const uint8_t *w, const uint16_t *szp,
                     uint16_t *y, int64_t M, int64_t N, int64_t Kp, int64_t G, int64_t blk) {
    const int64_t n = blk * A8_ROWS;
    const int64_t groups = Kp / G;
    const __mmask16 live = N - n >= A8_ROWS ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
    const uint8_t *wb = w + blk * Kp * (A8_ROWS / 2);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    A8_EACH_CHUNK(A8_DOT);
}

/* Rows [m0, m0 + mb) of x quantized into chunk form: each row's codes and per-group
 * values are first written row-major to the scratch rowq / rowv (one row at a time), then
 * spread into the chunk. */
static void a8_quantize_chunk(const uint16_t *x, int64_t m0, int64_t mb, int64_t K, int64_t Kp, int64_t G,
                              int8_t *rowq, float *rowv, int8_t *dq, float *da, float *dsum, int32_t *dneg8) {
    const int64_t groups = Kp / G;
    float *ra = rowv, *rsum = rowv + groups;
    int32_t *rqs = (int32_t *)(rowv + 2 * groups);
    for (int64_t i = 0; i < mb; i++) {
        a8_quantize_row(x + (m0 + i) * K, rowq, ra, rsum, rqs, K, G);
        for (int64_t t = 0; t < Kp / 8; t++) memcpy(dq + (t * mb + i) * 8, rowq + 8 * t, 8);
        for (int64_t g = 0; g < groups; g++) {
            da[g * mb + i] = ra[g];
            dsum[g * mb + i] = rsum[g];
            dneg8[g * mb + i] = -8 * rqs[g];
        }
    }
}

/* The activations of x (M, K) rounded into chunks, then BLOCK_CALL for every block of 16
 * outputs, the rows in spans whose codes stay in L2 while every block passes over them.
 * One team for the activations and the products (no second fork and join, and the
 * rounding of the activations no longer runs on one thread while the other waits). */
#define A8_RUN(BLOCK_CALL)                                                                            \
    do {                                                                                              \
        const int64_t rowbytes = Kp + groups * (2 * sizeof(float) + sizeof(int32_t));                 \
        const int64_t per = (M * rowbytes + 63) / 64 * 64, rowsz = (rowbytes + 63) / 64 * 64;         \
        char *buf = malloc(per + nchunks * sizeof(a8_chunk) + team * rowsz + 64);                     \
        if (!buf) return 2;                                                                           \
        float *ca = (float *)buf, *csum = ca + M * groups;                                            \
        int32_t *cneg8 = (int32_t *)(csum + M * groups);                                              \
        int8_t *cq = (int8_t *)(cneg8 + M * groups);                                                  \
        a8_chunk *chunks = (a8_chunk *)(buf + per);                                                   \
        char *rows = (char *)(chunks + nchunks);                                                      \
        int64_t span = (A8_CHUNK_BYTES / Kp) / A8_MAX_MB;                                             \
        span = span < 1 ? 1 : span;                                                                   \
        _Pragma("omp parallel num_threads(team)")                                                     \
        {                                                                                             \
            char *mine = rows + omp_get_thread_num() * rowsz;                                         \
            float *rowv = (float *)mine;                                                              \
            int8_t *rowq = (int8_t *)(rowv + groups * 3);                                             \
            _Pragma("omp for schedule(static)")                                                       \
            for (int64_t c = 0; c < nchunks; c++) {                                                   \
                const int64_t m0 = c * A8_MAX_MB, mb = M - m0 < A8_MAX_MB ? M - m0 : A8_MAX_MB;       \
                a8_quantize_chunk(x, m0, mb, K, Kp, G, rowq, rowv, cq + m0 * Kp, ca + m0 * groups,    \
                                  csum + m0 * groups, cneg8 + m0 * groups);                           \
                chunks[c] = (a8_chunk){cq + m0 * Kp, ca + m0 * groups, csum + m0 * groups, cneg8 + m0 * groups}; \
            }                                                                                         \
            for (int64_t c0 = 0; c0 < nchunks; c0 += span) {                                          \
                const int64_t c1 = c0 + span < nchunks ? c0 + span : nchunks;                         \
                _Pragma("omp for schedule(static)")                                                   \
                for (int64_t blk = 0; blk < blocks; blk++) BLOCK_CALL;                                \
            }                                                                                         \
        }                                                                                             \
        free(buf);                                                                                    \
    } while (0)

/* x (M, K) bf16; w the packed codes (ceil(N / 16) blocks of Kp * 8 bytes); sz
 * (ceil(K / G), N, 2) bf16 scales and zeros; y (M, N) bf16. G a multiple of 8. */
int int4a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t G, int nthreads) {
    if (G % 8 || M < 1) return M < 1 ? 0 : 1;
    const int64_t groups = (K + G - 1) / G, Kp = groups * G;
    const int64_t nchunks = (M + A8_MAX_MB - 1) / A8_MAX_MB;
    const int team = M * N * K >= A8_PARALLEL_MIN ? (nthreads > 0 ? nthreads : 1) : 1;
    const int64_t blocks = (N + A8_ROWS - 1) / A8_ROWS;
    A8_RUN(a8_block(chunks, c0, c1, w, sz, y, M, N, Kp, G, blk));
    return 0;
}

/* Int8 weights: per step of 8 columns, two 64-byte loads of 16 rows x 4 codes, one
 * VPDPBUSD each; per group the integer sums scale by the activations' a, and the weight
 * scale and bias apply once at the end. */
#define W8_DOT(MB)                                                                                    \
    do {                                                                                              \
        __m512 tot[MB];                                                                               \
        for (int i = 0; i < MB; i++) tot[i] = _mm512_setzero_ps();                                    \
        const int32_t *xs = (const int32_t *)ch->xq;                                                  \
        for (int64_t g = 0; g < groups; g++) {                                                        \
            __m512i acc[MB];                                                                          \
            /* sum q xq = sum (q + 128) xq - 128 sum xq, exact in int32 (neg8 holds -8 sum xq) */     \
            for (int i = 0; i < MB; i++) acc[i] = _mm512_set1_epi32(16 * ch->neg8[g * MB + i]);       \
            const uint8_t *wg = wb + g * G * A8_ROWS;                                                 \
            for (int64_t t = 0; t < G / 8; t++, xs += 2 * MB) {                                       \
                _mm_prefetch((const char *)(wg + 128 * t + Kp * A8_ROWS), _MM_HINT_T0);               \
                _mm_prefetch((const char *)(wg + 128 * t + 64 + Kp * A8_ROWS), _MM_HINT_T0);          \
                const __m512i c0 = _mm512_loadu_si512(wg + 128 * t);                                  \
                const __m512i c1 = _mm512_loadu_si512(wg + 128 * t + 64);                             \
                for (int i = 0; i < MB; i++) {                                                        \
                    acc[i] = a8_dpbusd(acc[i], c0, xs + 2 * i);                                       \
                    acc[i] = a8_dpbusd(acc[i], c1, xs + 2 * i + 1);                                   \
                }                                                                                     \
            }                                                                                         \
            for (int i = 0; i < MB; i++)                                                              \
                tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), _mm512_set1_ps(ch->a[g * MB + i]), tot[i]); \
        }                                                                                             \
        for (int i = 0; i < MB; i++)                                                                  \
            _mm256_mask_storeu_epi16(y + (m0 + i) * N + n, (__mmask16)live,                           \
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(tot[i], s, b)));      \
    } while (0)

static void w8_block(const a8_chunk *chunks, int64_t c0, int64_t c1, const uint8_t *w, const uint16_t *scales,
                     const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t Kp, int64_t G, int64_t blk) {
    const int64_t n = blk * A8_ROWS;
    const int64_t groups = Kp / G;
    const __mmask16 live = N - n >= A8_ROWS ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
    const uint8_t *wb = w + blk * Kp * A8_ROWS;
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, scales + n)), 16));
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, bias + n)), 16))
                          : _mm512_setzero_ps();
    A8_EACH_CHUNK(W8_DOT);
}

/* x (M, K) bf16; w the packed codes q + 128 (ceil(N / 16) blocks of Kp * 16 bytes, Kp = K
 * rounded up to the activation group G); scales (N,) bf16; bias (N,) bf16 or NULL; y (M,
 * N) bf16. G a multiple of 8. */
int int8a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    if (G % 8 || M < 1) return M < 1 ? 0 : 1;
    const int64_t groups = (K + G - 1) / G, Kp = groups * G;
    const int64_t nchunks = (M + A8_MAX_MB - 1) / A8_MAX_MB;
    const int team = M * N * K >= A8_PARALLEL_MIN ? (nthreads > 0 ? nthreads : 1) : 1;
    const int64_t blocks = (N + A8_ROWS - 1) / A8_ROWS;
    A8_RUN(w8_block(chunks, c0, c1, w, scales, bias, y, M, N, Kp, G, blk));
    return 0;
}

#else

int int4a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t G, int nthreads) {
    (void)x, (void)w, (void)sz, (void)y, (void)M, (void)N, (void)K, (void)G, (void)nthreads;
    return 1;
}

int int8a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    (void)x, (void)w, (void)scales, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)G, (void)nthreads;
    return 1;
}

#endif
