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

/* OpenMP is optional: a compiler without it (Apple's clang, clang without libomp, zig cc) builds
 * the kernels with -fopenmp-simd, which keeps the simd pragmas and ignores the others, so every
 * parallel region runs on one thread. These stand in for the two runtime calls the kernels make;
 * kvlens_openmp_threads (limits.c) tells Python which build it has. */
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* The kernels' limits. Python never copies these: limits.c exports them and
 * kvlens/kernels/build.py reads them from the loaded library. */

/* Inputs with more rows than this (a prefill) go to torch. Up to 32 rows the native product is
 * well ahead of MKL's; at 64 they are close (benchmarks/bench_matvec.py times both). matmul.c
 * needs it to be at most 512 (its accumulator block holds 16 columns of every row). */
#define KVLENS_MAX_ROWS 32
/* Products with weights smaller than this run on one thread. */
#define KVLENS_SINGLE_THREAD_BYTES (256 * 1024)
/* Attention (attention.c) handles at most this many query heads per key head, and heads at most
 * this wide: its per-chunk buffers live on the stack with these sizes. */
#define KVLENS_ATTENTION_MAX_GROUP 8
#define KVLENS_ATTENTION_MAX_D_HEAD 256

/* y = x @ W (+ b) on the first t threads of the team (t <= team size, the same on every thread).
 * scratch: (t - 1) * M * N floats. */
void kvlens__matmul_team(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                         const float *W, const float *b, float *y, float *scratch, int t);

/* y = x @ W^T (+ b) with W [N, K] of ggml blocks of `type` (quant.c), on the first t threads
 * of the team; each output summed by one thread in a fixed order, so bitwise independent of t
 * and M. */
void kvlens__qmatmul_team(int64_t M, int64_t K, int64_t N, int type, const uint8_t *W,
                          const float *x, int64_t ldx, const float *bias, float *y, int64_t ldy,
                          int t);

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
/* kvlens_decode_layer's argument (layer.c), mirrored field for field by kvlens/kernels/layer.py
 * (ctypes), which checks its mirror against kvlens_layer_size and kvlens_layer_field (limits.c). */
typedef struct {
    int64_t rows, d_model, n_heads, n_kv, d_head, d_mlp, rotary_half;
    int64_t pos;            /* the new key and value go to this position; attention reads 0..pos */
    int64_t s_b, s_h, s_p;  /* strides of the cache's keys and values, in floats */
    int64_t ms_b, cos_row;  /* mask row stride (bytes), cos/sin row stride (0: one shared row) */
    float eps, scale;
    int32_t adjacent, threads;
    int32_t layer_norm;     /* 1: LayerNorm (with ln*_b), 0: RMSNorm */
    int32_t gated;          /* 1: w_in is [d_model, 2 d_mlp] gate then input, SiLU; 0: plain */
    int32_t act;            /* the plain MLP's activation, KVLENS_ACT_* */
    int32_t parallel;       /* 1: attention and MLP both read x (GPT-NeoX) */
    /* Each matrix's kind: 0 for fp32 [in, out]; else ggml's block type (quant.c), the matrix
     * held as rows of blocks [out, in]. */
    int32_t q_qkv, q_o, q_in, q_out;
    const float *x;         /* [rows, d_model], the residual stream entering the layer */
    float *out;             /* [rows, d_model], leaving it */
    const float *ln1_w, *ln1_b, *b_qkv, *b_o, *ln2_w, *ln2_b, *b_in, *b_out;
    const void *w_qkv, *w_o, *w_in, *w_out; /* fp32 or blocks, by q_* */
    const float *cos, *sin; /* rotary angles, NULL for a model without rotary */
    float *k_cache, *v_cache;
    const uint8_t *mask;    /* [rows, pos + 1] with row stride ms_b, or NULL */
    float *work;            /* kvlens_decode_layer_workspace(...) floats */
} kvlens_layer;

#endif
