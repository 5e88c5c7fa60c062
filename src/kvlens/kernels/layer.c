/* One decoder layer of a decode step in one call, for a few rows of one new token: RMSNorm or
 * LayerNorm, attention with optional (partial) rotary, a gated SiLU MLP or a plain MLP with its
 * activation, sequential or parallel residual (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2). Each
 * weight matrix is fp32 or ggml blocks (a quantized model's; quant.c).
 *
 * Called one op at a time from Python, a layer costs about a dozen native or torch calls, each
 * with its own Python dispatch and OpenMP fork and join, milliseconds per step at batch 1
 * (docs/benchmarks.md, "Where the time goes"). Here the whole layer runs in a single parallel
 * region, its phases separated by barriers. Every phase calls the same function the op-by-op
 * path calls, on the same rows with the same thread split, so the result is bitwise equal to
 * that path's: a hook that returns its input (which makes kvlens take the op-by-op path)
 * changes nothing.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static int64_t qkv_width(const kvlens_layer *L) { return (L->n_heads + 2 * L->n_kv) * L->d_head; }

/* Floats of L->work the layer needs with L->threads threads. */
int64_t kvlens_decode_layer_workspace(const kvlens_layer *L) {
    const int64_t R = L->rows, D = L->d_model, W = qkv_width(L), F = L->d_mlp;
    const int64_t widest = max64(max64(W, D), 2 * F);
    const int64_t attention =
        kvlens__attention_scratch(R, L->n_heads, L->n_kv, L->d_head, L->pos + 1);
    return R * (4 * D + W + L->n_heads * L->d_head + 3 * F) +
           (int64_t)(L->threads - 1) * R * widest + attention;
}

/* Threads a product of a K x N weight gets: one for small weights, as kernels.matmul decides. */
static int product_threads(int64_t K, int64_t N, int team) {
    return K * N * 4 < KVLENS_SINGLE_THREAD_BYTES ? 1 : team;
}

/* Row r of the norm of x into y (rows d_model apart in both). */
static void norm_row(const kvlens_layer *L, int64_t r, const float *x, const float *w,
                     const float *b, float *y) {
    const int64_t D = L->d_model;
    if (L->layer_norm)
        kvlens_layer_norm(1, D, x + r * D, D, w, b, L->eps, y + r * D);
    else
        kvlens_rms_norm(1, D, x + r * D, D, w, L->eps, y + r * D);
}

/* y[M, N] = x[M, K] @ W (+ b) on the team: W fp32 [K, N] (type 0) or blocks [N, K]. */
static void product(int type, int64_t M, int64_t K, int64_t N, const float *x, const void *W,
                    const float *b, float *y, float *partial, int team) {
    if (type)
        kvlens__qmatmul_team(M, K, N, type, W, x, K, b, y, N, team);
    else
        kvlens__matmul_team(M, K, N, x, K, W, b, y, partial, product_threads(K, N, team));
}

/* This thread's share [c0, c1) of n columns, in pieces of multiples of 64. */
static void share(int64_t n, int t, int i, int64_t *c0, int64_t *c1) {
    int64_t per = (n + t - 1) / t;
    per += (64 - per % 64) % 64;
    *c0 = per * i < n ? per * i : n;
    *c1 = *c0 + per < n ? *c0 + per : n;
}

void kvlens_decode_layer(const kvlens_layer *L) {
    const int64_t R = L->rows, D = L->d_model, W = qkv_width(L), F = L->d_mlp;
    const int64_t H = L->n_heads, KV = L->n_kv, dh = L->d_head, HD = H * dh;
    float *xn = L->work, *qkv = xn + R * D, *z = qkv + R * W, *ao = z + R * HD;
    float *mid = ao + R * D, *gate_in = mid + R * D, *post = gate_in + R * 2 * F;
    float *mo = post + R * F, *partial = mo + R * D;
    float *att = partial + (int64_t)(L->threads - 1) * R * max64(max64(W, D), 2 * F);
#pragma omp parallel num_threads(L->threads)
    {
        const int team = omp_get_num_threads(), i = omp_get_thread_num();
        /* Attention half: norm, q/k/v, rotary, the new key and value into the cache. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++)
            norm_row(L, r, L->x, L->ln1_w, L->ln1_b, xn);
        product(L->q_qkv, R, D, W, xn, L->w_qkv, L->b_qkv, qkv, partial, team);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            float *row = qkv + r * W;
            if (L->cos)
                kvlens_rotary_inplace(1, H + KV, L->rotary_half, row, W, dh,
                                      L->cos + r * L->cos_row, L->sin + r * L->cos_row, 0,
                                      L->adjacent);
            for (int64_t g = 0; g < KV; g++) {
                const int64_t at = r * L->s_b + g * L->s_h + L->pos * L->s_p;
                memcpy(L->k_cache + at, row + (H + g) * dh, sizeof(float) * (size_t)dh);
                memcpy(L->v_cache + at, row + (H + KV + g) * dh, sizeof(float) * (size_t)dh);
            }
        }
        kvlens__attention_team(R, H, KV, dh, L->pos + 1, qkv, W, dh, L->k_cache, L->v_cache,
                               L->s_b, L->s_h, L->s_p, L->mask, L->ms_b, L->scale, z, 0, att);
        product(L->q_o, R, HD, D, z, L->w_o, L->b_o, ao, partial, team);
        /* MLP half: on x itself (parallel) or on x plus the attention's output. */
        const float *mlp_in = L->parallel ? L->x : mid;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            if (!L->parallel)
                for (int64_t c = 0; c < D; c++) mid[r * D + c] = L->x[r * D + c] + ao[r * D + c];
            norm_row(L, r, mlp_in, L->ln2_w, L->ln2_b, xn);
        }
        const int64_t in_width = L->gated ? 2 * F : F;
        product(L->q_in, R, D, in_width, xn, L->w_in, L->b_in, gate_in, partial, team);
        int64_t c0, c1;
        share(F, team, i, &c0, &c1);
        for (int64_t r = 0; r < R && c0 < c1; r++) {
            const float *row = gate_in + r * in_width;
            if (L->gated)
                kvlens_silu_mul(1, c1 - c0, row + c0, 2 * F, row + F + c0, 2 * F,
                                post + r * F + c0);
            else
                kvlens_activation(1, c1 - c0, row + c0, F, post + r * F + c0, L->act);
        }
#pragma omp barrier
        product(L->q_out, R, F, D, post, L->w_out, L->b_out, mo, partial, team);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < D; c++) {
                const int64_t at = r * D + c;
                L->out[at] = L->parallel ? (L->x[at] + ao[at]) + mo[at] : mid[at] + mo[at];
            }
    }
}
