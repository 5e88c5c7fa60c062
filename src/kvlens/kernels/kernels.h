/* What one kernel file uses of another: the team-level forms of the decode kernels.
 *
 * A "team" function is called by every thread of an OpenMP parallel region that is already
 * running, and ends with a barrier, so its output is complete for all threads when it returns.
 * The public functions (kvlens_matmul_small, kvlens_decode_attention) open a region and call
 * them; kvlens_decode_layer (layer.c) runs a whole layer in one region, and because it calls the
 * same functions its results are bitwise equal to the layer's ops called one by one.
 */
#ifndef KVLENS_KERNELS_H
#define KVLENS_KERNELS_H
#include <stdint.h>

/* Products with weights smaller than this run on one thread (as in kvlens/kernels/__init__.py). */
#define KVLENS_SINGLE_THREAD_BYTES (256 * 1024)

/* y = x @ W (+ b) on the first t threads of the team (t <= team size, the same on every thread).
 * scratch: (t - 1) * M * N floats. */
void kvlens__matmul_team(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                         const float *W, const float *b, float *y, float *scratch, int t);

/* kvlens_decode_attention's work, shared among the team (lse may be NULL). */
void kvlens__attention_team(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                            int64_t kv_len, const float *q, int64_t qs_b, int64_t qs_h,
                            const float *k, const float *v, int64_t s_b, int64_t s_h,
                            int64_t s_p, const uint8_t *mask, int64_t ms_b, float scale,
                            float *out, float *lse, float *scratch);

/* Floats of scratch kvlens_decode_attention needs. */
int64_t kvlens__attention_scratch(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                                  int64_t kv_len);

void kvlens_rms_norm(int64_t rows, int64_t d, const float *x, int64_t ldx, const float *w,
                     float eps, float *y);
void kvlens_rotary_inplace(int64_t rows, int64_t heads, int64_t half, float *x, int64_t xs_r,
                           int64_t xs_h, const float *cos, const float *sin, int64_t cs_r,
                           int adjacent);
/* Activations of kvlens_activation (as kvlens/kernels/__init__.py numbers them). */
#define KVLENS_ACT_GELU 0
#define KVLENS_ACT_GELU_TANH 1
#define KVLENS_ACT_RELU 2
#define KVLENS_ACT_SILU 3

void kvlens_layer_norm(int64_t rows, int64_t d, const float *x, int64_t ldx, const float *w,
                       const float *b, float eps, float *y);
void kvlens_activation(int64_t rows, int64_t d, const float *x, int64_t ldx, float *out,
                       int kind);
void kvlens_silu_mul(int64_t rows, int64_t d, const float *gate, int64_t ldg, const float *up,
                     int64_t ldu, float *out);
#endif
