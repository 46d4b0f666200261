/* The whole decoder stack of a Llama-family or Gemma 3 model for one decode step, in one call.
 *
 * A decode step of a small model spends more time in Python and in starting PyTorch ops
 * than in reading weights: 30 layers times a dozen ops, each a few microseconds of
 * dispatch. This runs the same chain as the model's decoder layers for rows that are all
 * decode tokens (one new token each), calling the package's own kernels in the same order
 * with the same bf16 roundings, so its output equals the layer-by-layer path's bit for bit.
 * Llama (LlamaDecoderLayer; Qwen3 adds the per-head q/k norms):
 *
 *   residual = x + residual; h = rmsnorm(residual) * w_in       (layer 0: residual = x)
 *   qkv = h W_qkv; [q, k = norm per head]; rope on q and k; k, v -> their cache slots
 *   a = attention(q, cache); residual = a W_o + residual; h = rmsnorm(residual) * w_post
 *   x = (silu(h W_gate) * h W_up) W_down
 *   after the last layer: out = x + residual
 *
 * Gemma 3 (Gemma3DecoderLayer): norms scale by (1 + w) in float32, four per layer, the
 * rope of each layer is the local or the global one, the MLP gate is GELU-tanh:
 *
 *   h = norm_in(x); qkv = h W_qkv; q, k = norm per head; rope; k, v -> cache
 *   x = x + norm_post(attention(q, cache) W_o)
 *   x = x + norm_post_ff((gelu(h' W_gate) * h' W_up) W_down), h' = norm_pre_ff(x)
 *
 * RMSNorm sums its squares in the order of ATen's vectorized CPU sum (four interleaved
 * accumulators of `lanes` floats, then the lanes one after another), which is what the
 * reference path computes; the Python side checks the two agree on this machine before
 * it uses this path. Linear layers are bf16 (N, K) weights through bf16_gemv, int8 codes
 * through int8_gemm_bf16 (int8a8_gemm_bf16 for w8a8 layers), or int4 codes through
 * int4_gemm_bf16 (int4a8_gemm_bf16 for w4a8 layers), in any mix.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* Every product here is rounded before it is summed, as in PyTorch: no fused multiply-adds. */
#pragma GCC optimize("fp-contract=off")

int bf16_gemv(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M, int64_t N,
              int64_t K, int nthreads);
int int4_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                   int64_t K, int64_t G, int nthreads);
int int4a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int64_t G, int nthreads);
int int8a8_gemm_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads);
int int8_gemm_bf16(const uint16_t *x, const int8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                   int64_t M, int64_t N, int64_t K, int nthreads);
void rope_bf16(uint16_t *x, const uint16_t *cos_t, const uint16_t *sin_t, int64_t rows, int heads, int D,
               int64_t row_stride, int nthreads);
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int I, int nthreads);
void gelu_tanh_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int I, int nthreads);
void kv_write(const char *k, const char *v, int64_t k_stride, int64_t v_stride, const int64_t *slots, int64_t n,
              char *k_cache, char *v_cache, int64_t k_row, int64_t v_row);
int paged_decode_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *tables,
                      int64_t width, const int64_t *lens, uint16_t *out, int R, int H, int Hkv, int D, int Dv,
                      int block_size, float scale, int window, int nthreads);

/* One linear layer: a bf16 (N, K) weight (group == 0), int8 codes in int8_gemm_bf16's
 * layout (int8a8_gemm_bf16's with act8) with (N,) bf16 scales in scales_zeros (group ==
 * -1), or int4 codes in
 * int4_gemm_bf16's layout with (ceil(K / group), N, 2) bf16 scales and zeros. */
/* inputs per activation scale of w8a8 layers (cpu_kernels.W8A8_GROUP) */
#define W8A8_GROUP 32

typedef struct {
    const void *weight;
    const uint16_t *scales_zeros;
    const uint16_t *bias; /* (N,) bf16 or NULL */
    int64_t N, K, group;
    int64_t act8; /* round the activations to int8 (int4a8_gemm_bf16, int8a8_gemm_bf16 in groups of 32) */
} ds_linear;

typedef struct {
    const uint16_t *input_norm, *post_norm; /* (C,) bf16; post_norm: after attention (Gemma: of its output) */
    ds_linear qkv, o, gate_up, down;
    int64_t window; /* 0: none */
    const uint16_t *pre_ff_norm, *post_ff_norm; /* Gemma 3: around the MLP; else NULL */
    const uint16_t *q_norm, *k_norm;           /* (head_dim,) per-head norms of q and k, or NULL */
    int64_t local_rope;                         /* Gemma 3: this layer takes the local rope tables */
} ds_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, block_size, lanes, nthreads;
    double eps, scale;
    int64_t gemma; /* the Gemma 3 layer: (1 + w) norms in float32, four of them, GELU-tanh gate */
} ds_dims;

#define DS_MAX_LANES 16

/* The float32 sum of v[0..n) in the order of ATen's vectorized inner sum with vectors of
 * `lanes` floats: vectors 4i + k go to accumulator k in a cascade of levels of 16, the
 * four accumulators are added, the scalar tail is summed, then the lanes in order. */
static float ds_aten_sum(const float *v, int64_t n, int lanes) {
    const int64_t nvec = n / lanes, nilp = nvec / 4;
    float acc[4][4][DS_MAX_LANES];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + 16 <= nilp) {
        for (int j = 0; j < 16; j++, i++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++) acc[0][k][l] += v[(4 * i + k) * lanes + l];
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & ((int64_t)15 << (4 * j))) break;
        }
    }
    for (; i < nilp; i++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += v[(4 * i + k) * lanes + l];
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t r = nilp * 4; r < nvec; r++)
        for (int l = 0; l < lanes; l++) acc[0][0][l] += v[r * lanes + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t r = nvec * lanes; r < n; r++) total += v[r];
    for (int l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

/* 1 / sqrt(mean(s^2) + eps) of the C floats of row x (bf16), as torch.rsqrt gives it. */
static float ds_rstd(const uint16_t *x, int64_t C, float eps, int lanes, float *scratch) {
    for (int64_t c = 0; c < C; c++) {
        const float f = bf16_to_f32(x[c]);
        scratch[c] = f * f;
    }
    const float mean = ds_aten_sum(scratch, C, lanes) / (float)C;
    return 1.0f / sqrtf(mean + eps);
}

/* One row, in place allowed. Llama: out = bf16(w * bf16(s * r)) (RMSNorm in float32, cast,
 * then scaled in bf16); offset (Gemma): out = bf16(s * r * (w + 1)), all in float32, as
 * F.rms_norm with the float32 weight w + 1 computes it. */
static void ds_norm_row(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t C, float eps, int lanes,
                        int offset, float *scratch) {
    const float r = ds_rstd(x, C, eps, lanes, scratch);
    if (offset)
        for (int64_t c = 0; c < C; c++) out[c] = f32_to_bf16(bf16_to_f32(x[c]) * r * (bf16_to_f32(w[c]) + 1.0f));
    else
        for (int64_t c = 0; c < C; c++) out[c] = f32_to_bf16(bf16_to_f32(w[c]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(x[c]) * r)));
}

/* out = norm of each row of x (M, C), Llama's (offset 0) or Gemma's (offset 1); with
 * `add`, x = bf16(x + add) first (written back to x: the residual stream). */
static void ds_rmsnorm(uint16_t *x, const uint16_t *add, const uint16_t *w, uint16_t *out, int64_t M, int64_t C,
                       float eps, int lanes, int offset, float *scratch) {
    for (int64_t m = 0; m < M; m++) {
        uint16_t *xr = x + m * C;
        if (add)
            for (int64_t c = 0; c < C; c++) xr[c] = f32_to_bf16(bf16_to_f32(xr[c]) + bf16_to_f32(add[m * C + c]));
        ds_norm_row(xr, w, out + m * C, C, eps, lanes, offset, scratch);
    }
}

/* Gemma: res = bf16(res + norm(y)) per row (M, C), y kept. */
static void ds_add_norm(uint16_t *res, const uint16_t *y, const uint16_t *w, uint16_t *tmp, int64_t M, int64_t C,
                        float eps, int lanes, float *scratch) {
    for (int64_t m = 0; m < M; m++) {
        ds_norm_row(y + m * C, w, tmp, C, eps, lanes, 1, scratch);
        for (int64_t c = 0; c < C; c++) res[m * C + c] = f32_to_bf16(bf16_to_f32(res[m * C + c]) + bf16_to_f32(tmp[c]));
    }
}

/* Exposed for the checks that this sum order is the one PyTorch uses on this machine:
 * the sums of M rows of n floats, and the whole norm. */
int decode_stack_sum(const float *v, float *out, int64_t M, int64_t n, int64_t lanes) {
    if (lanes < 1 || lanes > DS_MAX_LANES) return 1;
    for (int64_t m = 0; m < M; m++) out[m] = ds_aten_sum(v + m * n, n, (int)lanes);
    return 0;
}

/* The norm above for the Python side: the sum-order probe and the checks that the C norm
 * is PyTorch's, and the few-row norms of the layer path (layers/norms.py). x is written
 * only with `add`. */
int decode_stack_norm(uint16_t *x, const uint16_t *add, const uint16_t *w, uint16_t *out, int64_t M, int64_t C,
                      double eps, int64_t lanes, int64_t offset) {
    if (lanes < 1 || lanes > DS_MAX_LANES) return 1;
    float *scratch = malloc(C * sizeof(float));
    if (!scratch) return 2;
    ds_rmsnorm(x, add, w, out, M, C, (float)eps, (int)lanes, (int)offset, scratch);
    free(scratch);
    return 0;
}

static int ds_linear_run(const ds_linear *l, const uint16_t *x, uint16_t *y, int64_t M, int nthreads) {
    if (l->group == 0) return bf16_gemv(x, (const uint16_t *)l->weight, l->bias, y, M, l->N, l->K, nthreads);
    if (l->group < 0 && l->act8)
        return int8a8_gemm_bf16(x, (const uint8_t *)l->weight, l->scales_zeros, l->bias, y, M, l->N, l->K, W8A8_GROUP,
                                nthreads);
    if (l->group < 0) return int8_gemm_bf16(x, (const int8_t *)l->weight, l->scales_zeros, l->bias, y, M, l->N, l->K, nthreads);
    const int rc = (l->act8 ? int4a8_gemm_bf16 : int4_gemm_bf16)(x, (const uint8_t *)l->weight, l->scales_zeros,
                                                                  y, M, l->N, l->K, l->group, nthreads);
    if (rc == 0 && l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < l->N; n++) y[m * l->N + n] = f32_to_bf16(bf16_to_f32(y[m * l->N + n]) + bf16_to_f32(l->bias[n]));
    return rc;
}

/* Per-head norms in place on the q heads (H) and k heads (Hkv) of each qkv row. */
static void ds_qk_norm(uint16_t *qkv, const ds_layer *L, const ds_dims *d, int64_t M, int64_t QKV, float *scratch) {
    const int64_t D = d->head_dim;
    for (int64_t m = 0; m < M; m++) {
        uint16_t *row = qkv + m * QKV;
        for (int64_t h = 0; h < d->heads + d->kv_heads; h++)
            ds_norm_row(row + h * D, h < d->heads ? L->q_norm : L->k_norm, row + h * D, D, (float)d->eps,
                        (int)d->lanes, (int)d->gemma, scratch);
    }
}

/* x (M, C) bf16: the embeddings of M decode tokens in, the stack's output (before the
 * final norm) out. cos, sin (M, head_dim) bf16, and cos_l, sin_l for layers with the
 * local rope (Gemma 3; else NULL); slots (M,) cache slots of the new tokens; tables (M,
 * width) block ids; lens (M,) context lengths with the new token; k_caches, v_caches: per
 * layer, (blocks, block_size, kv_heads, head_dim) bf16. All checked by the caller.
 * Returns 0, or nonzero when a kernel could not run (x is then unchanged and the caller
 * runs the reference path, which rewrites the same slots). */
int decode_stack_bf16(const ds_layer *layers, const ds_dims *d, uint16_t *x, int64_t M, const uint16_t *cos_t,
                      const uint16_t *sin_t, const int64_t *slots, const int64_t *tables, int64_t width,
                      const int64_t *lens, uint16_t *const *k_caches, uint16_t *const *v_caches,
                      const uint16_t *cos_l, const uint16_t *sin_l) {
    const int64_t C = d->hidden, H = d->heads, Hkv = d->kv_heads, D = d->head_dim, I = d->intermediate;
    const int64_t QKV = (H + 2 * Hkv) * D;
    const int nt = (int)d->nthreads, lanes = (int)d->lanes, gemma = (int)d->gemma;
    const float eps = (float)d->eps;
    if (lanes < 1 || lanes > DS_MAX_LANES) return 1;
    const int64_t big = C > 2 * I ? C : 2 * I;
    /* a float row for the norms first (aligned, the longer of C and D), then residual, h,
     * qkv, q, attention out, gate_up, act and the layer output in bf16 */
    const int64_t frow = C > D ? C : D;
    const int64_t elems = M * (3 * C + QKV + 2 * H * D + big + I);
    float *row = malloc(frow * sizeof(float) + elems * sizeof(uint16_t));
    if (!row) return 2;
    uint16_t *res = (uint16_t *)(row + frow), *h = res + M * C, *qkv = h + M * C, *q = qkv + M * QKV;
    uint16_t *att = q + M * H * D, *gu = att + M * H * D, *act = gu + M * big, *y = act + M * I;
    int rc = 0;
    memcpy(res, x, M * C * sizeof(uint16_t));
    for (int64_t li = 0; li < d->layers && rc == 0; li++) {
        const ds_layer *L = &layers[li];
        /* Llama: the previous layer's MLP output joins the residual stream here */
        ds_rmsnorm(res, gemma || li == 0 ? NULL : y, L->input_norm, h, M, C, eps, lanes, gemma, row);
        if ((rc = ds_linear_run(&L->qkv, h, qkv, M, nt))) break;
        if (L->q_norm) ds_qk_norm(qkv, L, d, M, QKV, row);
        const int local = L->local_rope && cos_l;
        rope_bf16(qkv, local ? cos_l : cos_t, local ? sin_l : sin_t, M, (int)(H + Hkv), (int)D, QKV, nt);
        kv_write((const char *)(qkv + H * D), (const char *)(qkv + (H + Hkv) * D), QKV * 2, QKV * 2, slots, M,
                 (char *)k_caches[li], (char *)v_caches[li], Hkv * D * 2, Hkv * D * 2);
        for (int64_t m = 0; m < M; m++) memcpy(q + m * H * D, qkv + m * QKV, H * D * sizeof(uint16_t));
        if ((rc = paged_decode_bf16(q, k_caches[li], v_caches[li], tables, width, lens, att, (int)M, (int)H,
                                    (int)Hkv, (int)D, (int)D, (int)d->block_size, (float)d->scale,
                                    (int)L->window, nt)))
            break;
        if ((rc = ds_linear_run(&L->o, att, y, M, nt))) break;
        if (gemma) {
            ds_add_norm(res, y, L->post_norm, gu, M, C, eps, lanes, row);
            ds_rmsnorm(res, NULL, L->pre_ff_norm, h, M, C, eps, lanes, 1, row);
        } else {
            ds_rmsnorm(res, y, L->post_norm, h, M, C, eps, lanes, 0, row);
        }
        if ((rc = ds_linear_run(&L->gate_up, h, gu, M, nt))) break;
        (gemma ? gelu_tanh_mul_bf16 : silu_mul_bf16)(gu, act, M, (int)I, nt);
        if ((rc = ds_linear_run(&L->down, act, y, M, nt))) break;
        if (gemma) ds_add_norm(res, y, L->post_ff_norm, gu, M, C, eps, lanes, row);
    }
    if (rc == 0) {
        if (gemma)
            memcpy(x, res, M * C * sizeof(uint16_t));
        else
            for (int64_t i = 0; i < M * C; i++) x[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(res[i]));
    }
    free(row);
    return rc;
}
