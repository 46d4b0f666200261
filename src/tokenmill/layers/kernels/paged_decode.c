/* Decode attention over a paged KV cache on CPU: one query token per row.
 *
 * Reads each row's keys and values straight from its blocks, so nothing is gathered
 * or copied. A task (a row, or one KV head of a row when there are few rows) computes
 * the scores of its query heads, a float32 softmax and the weighted sum of values.
 *
 * q, out: (R, H, D); k_cache, v_cache: (num_blocks, block_size, H_kv, D);
 * tables: (R, width) block ids; lens: (R,) keys each row sees; window <= 0 means none.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"



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
#include <omp.h>

/* The bf16 kernel on CPUs with AVX512-BF16.
 *
 * - q.k runs as bf16 pair dot products with float32 accumulation (vdpbf16ps), 32 dims
 *   per instruction; the 16 partial-sum vectors of 16 keys are reduced together by one
 *   transpose-and-add tree (hsum16), four times fewer instructions than one horizontal
 *   sum per key.
 * - The weighted sum of values keeps the accumulators of up to four query heads in
 *   registers (128 columns of a head at a time) over a run of keys: a whole (row, KV head) task's,
 *   or one block's in a whole-row task (stored between blocks, so every head of a block
 *   is done while it is in L1).
 * - A task is a whole row when there are rows enough for every thread, so each of the
 *   row's blocks is read once, front to back, every KV head of it at once (all KV heads
 *   of a token are adjacent), with the next block prefetched; with fewer rows a task is
 *   one (row, KV head).
 * Head dims must be multiples of 32 (q, k) and 16 (v), and at most 256. */

/* The 16 horizontal sums of v[0..15], in order, in one vector. */
static inline __m512 hsum16(const __m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; ++i)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

/* Bytes of a row's keys and values asked into L2 when its thread's first task starts. */
#define PD_L2_AHEAD (256 << 10)

static inline void prefetch_block_l2(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
}

static inline void prefetch_block(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

/* exp(x) of 16 floats x <= 0, as exp_nonpositive; NaN propagates. */
static inline __m512 exp512_nonpositive(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 fn = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fn);
    __m512 p = _mm512_set1_ps(1.0938758e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.2757171e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.5800603e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5491037e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022436e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314705e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fn), _mm512_set1_epi32(127)), 23);
    const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    /* max(x, -87) drops a NaN: put it back. */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), e, x);
}

/* In-place softmax of n scores. */
static void softmax_avx512(float *s, int64_t n) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
    float m = _mm512_reduce_max_ps(mv);
    for (; t < n; ++t) m = s[t] > m ? s[t] : m;
    if (m != m) m = 0.f; /* a NaN score: let it reach the output, as the reference path does */
    const __m512 mb = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t < n; t += 16) {
        const __mmask16 k = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1u);
        const __m512 e = exp512_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), mb));
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
        _mm512_mask_storeu_ps(s + t, k, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    const __m512 inv = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);
    for (t = 0; t < n; t += 16) {
        const __mmask16 k = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1u);
        _mm512_mask_storeu_ps(s + t, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + t), inv));
    }
}

/* Blocks are scattered, so the hardware prefetcher loses the stream at each one: the next
 * block's lines are fetched while this block is computed.
 *
 * The keys of a task's KV heads are read block by block, every head of a block at once,
 * then the values likewise, so that each block streams from memory once, front to back,
 * with the next block requested while this one is computed. A task of one KV head passes
 * the cache offset by that head and its g query heads; the products and their order per
 * query head are the same either way, so whole-row and one-head tasks give the same bits. */

/* Blocks of another stream asked into L2 along with this pass, one per block passed. */
typedef struct {
    const uint16_t *cache;
    const int64_t *table;
    int64_t b, nblocks, block_elems;
} pd_side;

static inline void pd_side_step(pd_side *sd) {
    if (sd && sd->b < sd->nblocks) {
        prefetch_block_l2((const char *)(sd->cache + sd->table[sd->b] * sd->block_elems), sd->block_elems * 2);
        ++sd->b;
    }
}

/* sc (H, n): scores of the query heads qr (H, D), g per KV head, against keys [first, len). */
static void scores_avx512(const uint16_t *qr, const uint16_t *k_cache, const int64_t *table, int64_t first,
                              int64_t len, int H, int g, int D, int64_t kstride, int block_size, float scale,
                              float *sc, int64_t n, pd_side *side) {
    const int64_t nblocks = (len + block_size - 1) / block_size;
    const int64_t bsk = (int64_t)block_size * kstride;
    __m512 part[16];
    int64_t b = first / block_size;
    int o = (int)(first % block_size);
    const uint16_t *kb = k_cache + table[b] * bsk;
    if (n > 0) {
        if (b + 1 < nblocks) prefetch_block((const char *)(k_cache + table[b + 1] * bsk), bsk * 2);
        pd_side_step(side);
    }
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int m = n - t0 < 16 ? (int)(n - t0) : 16;
        const uint16_t *kp[16];
        for (int i = 0; i < m; ++i) {
            kp[i] = kb + (int64_t)o * kstride;
            if (++o == block_size && t0 + i + 1 < n) {
                o = 0;
                kb = k_cache + table[++b] * bsk;
                if (b + 1 < nblocks) prefetch_block((const char *)(k_cache + table[b + 1] * bsk), bsk * 2);
                pd_side_step(side);
            }
        }
        for (int h = 0; h < H; ++h) {
            const uint16_t *qj = qr + (int64_t)h * D;
            const int64_t koff = (int64_t)(h / g) * D;
            for (int i = 0; i < 16; ++i) part[i] = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 32) {
                const __m512bh qc = (__m512bh)_mm512_loadu_si512(qj + c);
                for (int i = 0; i < m; ++i)
                    part[i] = _mm512_dpbf16_ps(part[i], qc, (__m512bh)_mm512_loadu_si512(kp[i] + koff + c));
            }
            const __m512 s = _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sc + (int64_t)h * n + t0, (__mmask16)((1u << m) - 1u), s);
        }
    }
}

/* acc_io (JB, NC * 16) += probabilities (JB rows of sc, sstride apart) x values [first,
 * first + n) of one KV head (v_cache offset to it), walking the blocks of table; with
 * ahead, the next block is requested on entering each. JB and NC are constants at every
 * call, so the accumulators stay in registers over the whole range. */
static inline __attribute__((always_inline)) void pv_tile(const float *sc, int64_t sstride, const uint16_t *v_cache,
                                                          const int64_t *table, int64_t first, int64_t n,
                                                          int64_t vstride, int block_size, float *acc_io, int Dv,
                                                          int ahead, const int JB, const int NC) {
    const int64_t bsv = (int64_t)block_size * vstride;
    const int64_t nblocks = (first + n + block_size - 1) / block_size;
    __m512 acc[4][8];
    for (int jj = 0; jj < JB; ++jj)
        for (int c = 0; c < NC; ++c) acc[jj][c] = _mm512_loadu_ps(acc_io + (int64_t)jj * Dv + c * 16);
    int64_t b = first / block_size;
    int o = (int)(first % block_size);
    const uint16_t *vb = v_cache + table[b] * bsv;
    if (ahead && b + 1 < nblocks) prefetch_block((const char *)(v_cache + table[b + 1] * bsv), bsv * 2);
    for (int64_t t = 0; t < n; ++t) {
        const uint16_t *vp = vb + (int64_t)o * vstride;
        if (++o == block_size && t + 1 < n) {
            o = 0;
            vb = v_cache + table[++b] * bsv;
            if (ahead && b + 1 < nblocks) prefetch_block((const char *)(v_cache + table[b + 1] * bsv), bsv * 2);
        }
        __m512 pj[4];
        for (int jj = 0; jj < JB; ++jj) pj[jj] = _mm512_set1_ps(sc[(int64_t)jj * sstride + t]);
        for (int c = 0; c < NC; ++c) {
            const __m512 vf = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(vp + c * 16)));
            for (int jj = 0; jj < JB; ++jj) acc[jj][c] = _mm512_fmadd_ps(pj[jj], vf, acc[jj][c]);
        }
    }
    for (int jj = 0; jj < JB; ++jj)
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc_io + (int64_t)jj * Dv + c * 16, acc[jj][c]);
}

#define PV_JB(NC)                                                                                    \
    switch (jb) {                                                                                    \
        case 1: pv_tile(sc, sstride, v_cache, table, first, n, vstride, block_size, acc, Dv, ahead, 1, NC); break; \
        case 2: pv_tile(sc, sstride, v_cache, table, first, n, vstride, block_size, acc, Dv, ahead, 2, NC); break; \
        case 3: pv_tile(sc, sstride, v_cache, table, first, n, vstride, block_size, acc, Dv, ahead, 3, NC); break; \
        default: pv_tile(sc, sstride, v_cache, table, first, n, vstride, block_size, acc, Dv, ahead, 4, NC); break; \
    }

/* Over 64 columns, at most 2 query heads at a time (16 accumulators): pairs, then one. */
#define PV_JB2(NC)                                                                                   \
    for (int j = 0; j < jb; j += 2) {                                                                \
        const float *sj = sc + (int64_t)j * sstride;                                                 \
        float *aj = acc + (int64_t)j * Dv;                                                           \
        if (jb - j == 1) pv_tile(sj, sstride, v_cache, table, first, n, vstride, block_size, aj, Dv, ahead, 1, NC); \
        else pv_tile(sj, sstride, v_cache, table, first, n, vstride, block_size, aj, Dv, ahead, 2, NC);             \
    }

/* pv_tile for jb query heads and any head dim Dv (a multiple of 16, at most 256): head
 * dims over 128 in column chunks of 128, each a pass of its own over the values (16
 * accumulators at most), the next block asked for on the first. */
static void pv_tiles(const float *sc, int64_t sstride, const uint16_t *v_cache, const int64_t *table, int64_t first,
                     int64_t n, int64_t vstride, int block_size, float *acc, int Dv, int ahead, int jb) {
    for (int c0 = 0; c0 < Dv; c0 += 128, v_cache += 128, acc += 128, ahead = 0) {
        switch ((Dv - c0 < 128 ? Dv - c0 : 128) / 16) {
            case 1: PV_JB(1); break;
            case 2: PV_JB(2); break;
            case 3: PV_JB(3); break;
            case 4: PV_JB(4); break;
            case 5: PV_JB2(5); break;
            case 6: PV_JB2(6); break;
            case 7: PV_JB2(7); break;
            default: PV_JB2(8); break;
        }
    }
}

/* acc (H, Dv) = probabilities sc (H, n) x values [first, first + n), g query heads per KV
 * head. With side (whole rows), block by block, every KV head of a block at once; without,
 * each tile of query heads over the whole range (one KV head: no heads to share a block). */
static void values_avx512(const float *sc, const uint16_t *v_cache, const int64_t *table, int64_t first,
                          int64_t len, int H, int g, int Dv, int64_t vstride, int block_size, int64_t n, float *acc,
                          pd_side *side) {
    const int64_t nblocks = (len + block_size - 1) / block_size;
    const int64_t bsv = (int64_t)block_size * vstride;
    /* Query heads in tiles of up to 4 (up to 2 for head dims over 64): at most 16 live
     * accumulators, so the values and broadcast weights still fit in the 32 registers. */
    const int tile = Dv > 64 ? 2 : 4;
    memset(acc, 0, sizeof(float) * (size_t)H * Dv);
    if (!side) {
        for (int h0 = 0; h0 < H; h0 += g)
            for (int j0 = 0; j0 < g; j0 += tile)
                pv_tiles(sc + (int64_t)(h0 + j0) * n, n, v_cache + (int64_t)(h0 / g) * Dv, table, first, n, vstride,
                         block_size, acc + (int64_t)(h0 + j0) * Dv, Dv, 1, g - j0 < tile ? g - j0 : tile);
        return;
    }
    for (int64_t b = first / block_size, t = 0; b * block_size < len; ++b) {
        const int64_t p0 = b * block_size, from = p0 < first ? first : p0;
        const int64_t cnt = (len - p0 < block_size ? len : p0 + block_size) - from;
        if (b + 1 < nblocks) prefetch_block((const char *)(v_cache + table[b + 1] * bsv), bsv * 2);
        pd_side_step(side);
        for (int h0 = 0; h0 < H; h0 += g)
            for (int j0 = 0; j0 < g; j0 += tile)
                pv_tiles(sc + (int64_t)(h0 + j0) * n + t, n, v_cache + (int64_t)(h0 / g) * Dv, table, from, cnt,
                         vstride, block_size, acc + (int64_t)(h0 + j0) * Dv, Dv, 0, g - j0 < tile ? g - j0 : tile);
        t += cnt;
    }
    while (side->b < side->nblocks) pd_side_step(side);
}

/* n floats to bfloat16, rounding as f32_to_bf16 does (nearest, ties to even, NaN kept). */
static void store_bf16_avx512(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                       _mm512_set1_epi32(0x7f800000));
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

static int paged_decode_bf16_avx512(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                    const int64_t *tables, int64_t width, const int64_t *lens, uint16_t *out,
                                    int R, int H, int Hkv, int D, int Dv, int block_size, float scale,
                                    int window, int nthreads) {
    const int g = H / Hkv;
    const int64_t kstride = (int64_t)Hkv * D, vstride = (int64_t)Hkv * Dv;
    const int64_t bsk = (int64_t)block_size * kstride, bsv = (int64_t)block_size * vstride;
    /* Whole rows when every thread gets at least two; else (row, KV head) tasks. */
    const int whole = R >= 2 * nthreads;
    const int tasks = whole ? R : R * Hkv;
    int64_t longest = 1;
    for (int r = 0; r < R; ++r) {
        const int64_t n = window > 0 && lens[r] > window ? window : lens[r];
        longest = n > longest ? n : longest;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* Tasks go round-robin, so a thread knows its next row and asks for it early. */
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float *sc = (float *)malloc(sizeof(float) * (size_t)(whole ? H : g) * (size_t)longest);
        float *acc = (float *)malloc(sizeof(float) * (size_t)(whole ? H : g) * Dv);
        if (!sc || !acc) {
#pragma omp atomic write
            failed = 1;
        }
        for (int task = tid; sc && acc && task < tasks; task += nth) {
            const int r = whole ? task : task / Hkv;
            const int64_t len = lens[r];
            const int64_t first = (window > 0 && len > window) ? len - window : 0;
            const int64_t n = len - first;
            const int64_t *table = tables + (int64_t)r * width;
            if (whole) {
                /* Memory streams while the row computes: the thread's first row is asked
                 * into L2 at once; after that the score pass asks for this row's values
                 * and the value pass for the next row's keys, a block per block passed.
                 * Against per-head passes over a row asked for at once: 30 layers of 64
                 * rows of 64-128 scattered keys 1.2-1.3x faster, of 448-512 keys 1.45x;
                 * attention in a 64-row SmolLM2 decode step 11.5 -> 7.7 ms. */
                if (task == tid) {
                    const int64_t last = first / block_size + PD_L2_AHEAD / ((bsk + bsv) * 2);
                    for (int64_t b = first / block_size; b * block_size < len && b <= last; ++b) {
                        prefetch_block_l2((const char *)(k_cache + table[b] * bsk), bsk * 2);
                        prefetch_block_l2((const char *)(v_cache + table[b] * bsv), bsv * 2);
                    }
                }
                pd_side values = {v_cache, table, first / block_size, (len + block_size - 1) / block_size, bsv};
                pd_side next = {k_cache, table, 0, 0, bsk};
                if (task + nth < tasks) {
                    const int64_t ln = lens[task + nth], fn = (window > 0 && ln > window) ? ln - window : 0;
                    next = (pd_side){k_cache, tables + (int64_t)(task + nth) * width, fn / block_size,
                                     (ln + block_size - 1) / block_size, bsk};
                }
                scores_avx512(q + (int64_t)r * H * D, k_cache, table, first, len, H, g, D, kstride, block_size, scale,
                              sc, n, &values);
                for (int h = 0; h < H; ++h) softmax_avx512(sc + (int64_t)h * n, n);
                values_avx512(sc, v_cache, table, first, len, H, g, Dv, vstride, block_size, n, acc, &next);
                store_bf16_avx512(acc, out + (int64_t)r * H * Dv, (int64_t)H * Dv);
                continue;
            }
            const int hk = task % Hkv;
            scores_avx512(q + ((int64_t)r * H + (int64_t)hk * g) * D, k_cache + (int64_t)hk * D, table, first, len, g,
                          g, D, kstride, block_size, scale, sc, n, NULL);
            for (int j = 0; j < g; ++j) softmax_avx512(sc + (int64_t)j * n, n);
            values_avx512(sc, v_cache + (int64_t)hk * Dv, table, first, len, g, g, Dv, vstride, block_size, n, acc, NULL);
            store_bf16_avx512(acc, out + ((int64_t)r * H + (int64_t)hk * g) * Dv, (int64_t)g * Dv);
        }
        free(sc);
        free(acc);
    }
    return failed;
}

/* ---- causal attention of a prompt chunk -------------------------------------------------
 *
 * T queries at positions S - T .. S - 1 against S keys (the chunk's own and the earlier
 * context), each query seeing keys at positions <= its own (and, with a window W, > its
 * own - W). q (T, H, D) with row stride q_stride; k, v (S, Hkv, D / Dv) with row strides
 * k_stride / v_stride; out (T, H * Dv).
 *
 * The keys and values of each KV head are first repacked so that VDPBF16PS works along
 * the keys: keys in blocks of 16, one float32 lane per key, pairs of dimensions in each
 * lane (scores of 16 keys per instruction, no horizontal sums); values by pairs of keys,
 * pairs of keys in each lane (16 output dimensions per instruction). A task is a block of
 * PA_BQ queries of one query head: scores in float32, times the scale; softmax in
 * float32; probabilities rounded to bfloat16 (as the reference path rounds its softmax
 * output before the second product); the weighted sum of values in float32, rounded to
 * bfloat16 at the end. */
#define PA_BQ 16

static void pa_pack_keys(const uint16_t *k, int64_t k_stride, int64_t S, int D, uint16_t *kp) {
    /* kp: [ceil(S / 16)][D / 2][16][2] */
    const int64_t nb = (S + 15) / 16;
    for (int64_t b = 0; b < nb; ++b)
        for (int dp = 0; dp < D / 2; ++dp) {
            uint16_t *dst = kp + (b * (D / 2) + dp) * 32;
            for (int l = 0; l < 16; ++l) {
                const int64_t j = b * 16 + l;
                dst[2 * l] = j < S ? k[j * k_stride + 2 * dp] : 0;
                dst[2 * l + 1] = j < S ? k[j * k_stride + 2 * dp + 1] : 0;
            }
        }
}

static void pa_pack_values(const uint16_t *v, int64_t v_stride, int64_t S, int Dv, uint16_t *vp) {
    /* vp: [8 ceil(S / 16)][Dv][2], zeros past the last key (the score blocks read whole blocks) */
    for (int64_t jp = 0; jp < (S + 15) / 16 * 8; ++jp)
        for (int d = 0; d < Dv; ++d) {
            vp[(jp * Dv + d) * 2] = 2 * jp < S ? v[2 * jp * v_stride + d] : 0;
            vp[(jp * Dv + d) * 2 + 1] = 2 * jp + 1 < S ? v[(2 * jp + 1) * v_stride + d] : 0;
        }
}

/* Scores of rows r0 .. r0 + MB - 1 (query pointers qr[]) against key blocks [b0, b1). */
#define PA_SCORES(MB)                                                                               \
    do {                                                                                            \
        for (int64_t b = b0; b < b1; ++b) {                                                         \
            __m512 acc[MB];                                                                         \
            for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();                              \
            const uint16_t *kb = kp + b * (D / 2) * 32;                                             \
            for (int dp = 0; dp < D / 2; ++dp) {                                                    \
                const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + dp * 32);                     \
                for (int i = 0; i < MB; ++i) {                                                      \
                    int32_t pair;                                                                   \
                    memcpy(&pair, qr[i] + 2 * dp, 4);                                               \
                    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), kv);        \
                }                                                                                   \
            }                                                                                       \
            for (int i = 0; i < MB; ++i)                                                            \
                _mm512_storeu_ps(sc + (int64_t)(r0 + i) * ns + (b - b0) * 16, _mm512_mul_ps(acc[i], vscale)); \
        }                                                                                           \
    } while (0)

/* out rows r0 .. r0 + MB - 1 = probabilities (bf16 pairs in pb) x values, NC vectors of 16. */
#define PA_VALUES(MB, NC)                                                                           \
    do {                                                                                            \
        __m512 acc[MB][NC];                                                                         \
        for (int i = 0; i < MB; ++i)                                                                \
            for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();                           \
        for (int64_t jp = 0; jp < np; ++jp) {                                                       \
            const uint16_t *vj = vp + (j0 / 2 + jp) * Dv * 2 + cb * 32;                             \
            __m512bh vv[NC];                                                                        \
            for (int c = 0; c < NC; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vj + c * 32);         \
            for (int i = 0; i < MB; ++i) {                                                          \
                int32_t pair;                                                                       \
                memcpy(&pair, pb + (int64_t)(r0 + i) * ns + 2 * jp, 4);                             \
                const __m512bh pv = (__m512bh)_mm512_set1_epi32(pair);                              \
                for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], pv, vv[c]);     \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < MB; ++i) {                                                              \
            uint16_t *o = out + (int64_t)(q0 + r0 + i) * H * Dv + (int64_t)h * Dv + cb * 16;        \
            for (int c = 0; c < NC; ++c)                                                            \
                _mm256_storeu_si256((__m256i *)(o + c * 16), (__m256i)_mm512_cvtneps_pbh(acc[i][c])); \
        }                                                                                           \
    } while (0)

/* Rows 3 and 4 only for chunks of up to 64 columns (pa_task picks the tile from nc). */
#define PA_VALUES_NC4(MB)                                                                           \
    switch (nc) {                                                                                   \
        case 1: PA_VALUES(MB, 1); break;                                                            \
        case 2: PA_VALUES(MB, 2); break;                                                            \
        case 3: PA_VALUES(MB, 3); break;                                                            \
        default: PA_VALUES(MB, 4); break;                                                           \
    }

#define PA_VALUES_NC(MB)                                                                            \
    switch (nc) {                                                                                   \
        case 1: PA_VALUES(MB, 1); break;                                                            \
        case 2: PA_VALUES(MB, 2); break;                                                            \
        case 3: PA_VALUES(MB, 3); break;                                                            \
        case 4: PA_VALUES(MB, 4); break;                                                            \
        case 5: PA_VALUES(MB, 5); break;                                                            \
        case 6: PA_VALUES(MB, 6); break;                                                            \
        case 7: PA_VALUES(MB, 7); break;                                                            \
        default: PA_VALUES(MB, 8); break;                                                           \
    }

static void pa_task(const uint16_t *q, int64_t q_stride, const uint16_t *kp, const uint16_t *vp, uint16_t *out,
                    int64_t T, int64_t S, int H, int D, int Dv, int h, int64_t q0, float scale, int64_t window,
                    float *sc, uint16_t *pb) {
    const int64_t rows = T - q0 < PA_BQ ? T - q0 : PA_BQ;
    const int64_t first_pos = S - T + q0, last_pos = first_pos + rows - 1;
    /* keys any row of the block sees: [j0, j1), j0 a multiple of 16 */
    int64_t j0 = window > 0 && first_pos - window + 1 > 0 ? first_pos - window + 1 : 0;
    j0 = j0 / 16 * 16;
    const int64_t j1 = last_pos + 1;
    const int64_t b0 = j0 / 16, b1 = (j1 + 15) / 16;
    const int64_t ns = (b1 - b0) * 16; /* the scratch row length (even) */
    const __m512 vscale = _mm512_set1_ps(scale);
    const uint16_t *qr[4];
    int64_t r0 = 0;
    for (; r0 < rows; r0 += 4) {
        const int mb = rows - r0 < 4 ? (int)(rows - r0) : 4;
        for (int i = 0; i < 4; ++i) qr[i] = q + (q0 + r0 + (i < mb ? i : 0)) * q_stride + (int64_t)h * D;
        switch (mb) {
            case 4: PA_SCORES(4); break;
            case 3: PA_SCORES(3); break;
            case 2: PA_SCORES(2); break;
            default: PA_SCORES(1); break;
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        float *sr = sc + r * ns;
        const int64_t pos = first_pos + r;
        const int64_t lo = window > 0 && pos - window + 1 > j0 ? pos - window + 1 : j0;
        for (int64_t j = j0; j < lo; ++j) sr[j - j0] = -INFINITY;
        for (int64_t j = pos + 1; j < j0 + ns; ++j) sr[j - j0] = -INFINITY;
        softmax_avx512(sr, ns);
        uint16_t *pr = pb + r * ns;
        for (int64_t t = 0; t < ns; t += 16)
            _mm256_storeu_si256((__m256i *)(pr + t), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sr + t)));
    }
    const int64_t np = ns / 2;
    /* head dims over 128 in column chunks of 128 (cb, nc: first column and width, in 16s) */
    for (int cb = 0; cb < Dv / 16; cb += 8) {
        const int nc = Dv / 16 - cb < 8 ? Dv / 16 - cb : 8;
        for (r0 = 0; r0 < rows;) {
            const int tile = nc > 4 ? 2 : 4; /* at most 16 accumulators */
            const int mb = rows - r0 < tile ? (int)(rows - r0) : tile;
            switch (mb) {
                case 4: PA_VALUES_NC4(4); break;
                case 3: PA_VALUES_NC4(3); break;
                case 2: PA_VALUES_NC(2); break;
                default: PA_VALUES_NC(1); break;
            }
            r0 += mb;
        }
    }
}

static int prefill_attention_avx512(const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride,
                                    const uint16_t *v, int64_t v_stride, uint16_t *out, int64_t T, int64_t S,
                                    int H, int Hkv, int D, int Dv, float scale, int64_t window, int nthreads) {
    const int g = H / Hkv;
    const int64_t nkb = (S + 15) / 16, kp_head = nkb * 16 * D, vp_head = nkb * 16 * Dv;
    uint16_t *kp = malloc(sizeof(uint16_t) * (size_t)(kp_head + vp_head) * Hkv);
    if (!kp) return 2;
    uint16_t *vp = kp + kp_head * Hkv;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int hk = 0; hk < Hkv; ++hk) {
        pa_pack_keys(k + (int64_t)hk * D, k_stride, S, D, kp + hk * kp_head);
        pa_pack_values(v + (int64_t)hk * Dv, v_stride, S, Dv, vp + hk * vp_head);
    }
    const int64_t qblocks = (T + PA_BQ - 1) / PA_BQ;
    int failed = 0;
    /* later query blocks see more keys: hand them out first, then the rest as threads free up */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t task = 0; task < qblocks * H; ++task) {
        const int64_t qb = qblocks - 1 - task / H;
        const int h = (int)(task % H);
        const int64_t ns = (S + 16) / 16 * 16 + 16;
        float *sc = malloc(sizeof(float) * PA_BQ * ns + sizeof(uint16_t) * PA_BQ * ns);
        if (!sc) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        pa_task(q, q_stride, kp + (h / g) * kp_head, vp + (h / g) * vp_head, out, T, S, H, D, Dv, h, qb * PA_BQ,
                scale, window, sc, (uint16_t *)(sc + PA_BQ * ns));
        free(sc);
    }
    free(kp);
    return failed ? 2 : 0;
}

#endif

int paged_decode_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *tables,
                      int64_t width, const int64_t *lens, uint16_t *out, int R, int H, int Hkv, int D, int Dv,
                      int block_size, float scale, int window, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (D % 32 == 0 && Dv % 16 == 0 && D <= 256 && Dv <= 256)
        return paged_decode_bf16_avx512(q, k_cache, v_cache, tables, width, lens, out, R, H, Hkv, D, Dv,
                                        block_size, scale, window, nthreads);
#endif
    return paged_decode_bf16_generic(q, k_cache, v_cache, tables, width, lens, out, R, H, Hkv, D, Dv,
                                     block_size, scale, window, nthreads);
}

/* Returns 0, 1 where this build or these sizes have no kernel (the caller keeps PyTorch's
 * path), 2 when scratch memory could not be allocated. */
int prefill_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride, const uint16_t *v,
                           int64_t v_stride, uint16_t *out, int64_t T, int64_t S, int H, int Hkv, int D, int Dv,
                           float scale, int64_t window, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (T >= 1 && S >= T && Hkv >= 1 && H % Hkv == 0 && D % 2 == 0 && D <= 256 && Dv % 16 == 0 && Dv <= 256)
        return prefill_attention_avx512(q, q_stride, k, k_stride, v, v_stride, out, T, S, H, Hkv, D, Dv, scale,
                                        window, nthreads);
#endif
    (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v, (void)v_stride, (void)out, (void)T, (void)S, (void)H;
    (void)Hkv, (void)D, (void)Dv, (void)scale, (void)window, (void)nthreads;
    return 1;
}
