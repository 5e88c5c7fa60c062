/* Small-batch fp32 matrix products for decoding: y[M, N] = x[M, K] @ W[K, N] (+ b[N]).
 *
 * W is row-major [in, out] (kvlens's weight layout) and M is small (a decode step's rows). Such
 * a product reads every weight once and does little arithmetic per byte, so its speed is the
 * speed at which W streams from memory. The loops below keep that stream sequential: each
 * thread reads whole rows of W (or long contiguous pieces of them), eight rows at a time, and
 * accumulates into a block of at most 32 KB that stays in the L1 cache. Each pass over the block
 * loads and stores it once, so more rows per pass means fewer trips for the same weights: eight
 * rows were faster than four at one and at eight rows of x; sixteen were faster at one row but
 * slower at eight (docs/benchmarks.md, "Where the time goes").
 *
 * Work is split between threads along K (each thread reads a contiguous band of rows and the
 * partial sums are added at the end) unless N is wide enough that splitting the columns still
 * gives each thread long contiguous pieces of every row. The summation order of a row of y
 * depends on K, N and the thread count, never on M or on the other rows, so a row computed in a
 * batch is bitwise equal to the same row computed alone. With the column split every column is
 * summed over all of K in one order, so the result is bitwise the one-thread result; with the K
 * split the threads' partial sums round differently for each thread count
 * (tests/unit/kernels/test_threads.py).
 *
 * Built at first use by kvlens/kernels/build.py with the system C compiler and OpenMP where the
 * compiler has it (the runtime torch has already loaded, so both share one thread pool), else
 * single-threaded.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define BLOCK_FLOATS 8192 /* accumulator block: M * block width <= 8192 floats = 32 KB */
#define SPLIT_COLUMNS_MIN 4096 /* columns per thread from which the column split is used */
_Static_assert(KVLENS_MAX_ROWS * 16 <= BLOCK_FLOATS, "band() needs 16 columns of every row");

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* acc[m, 0:nb] += sum over k in [k0, k1) of x[m, k] * W[k, n0:n0+nb], acc rows nb apart. */
static void accumulate(int64_t M, int64_t k0, int64_t k1, int64_t N, int64_t n0, int64_t nb,
                       const float *restrict x, int64_t ldx, const float *restrict W,
                       float *restrict acc) {
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
        const float *restrict w = W + k * N + n0;
        for (int64_t m = 0; m < M; m++) {
            const float *a = x + m * ldx + k;
            const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
            const float a4 = a[4], a5 = a[5], a6 = a[6], a7 = a[7];
            float *restrict row = acc + m * nb;
#pragma omp simd
            for (int64_t j = 0; j < nb; j++)
                row[j] += ((a0 * w[j] + a1 * w[N + j]) + (a2 * w[2 * N + j] + a3 * w[3 * N + j])) +
                          ((a4 * w[4 * N + j] + a5 * w[5 * N + j]) +
                           (a6 * w[6 * N + j] + a7 * w[7 * N + j]));
        }
    }
    for (; k + 4 <= k1; k += 4) {
        const float *restrict w0 = W + k * N + n0;
        const float *restrict w1 = w0 + N;
        const float *restrict w2 = w1 + N;
        const float *restrict w3 = w2 + N;
        for (int64_t m = 0; m < M; m++) {
            const float a0 = x[m * ldx + k], a1 = x[m * ldx + k + 1];
            const float a2 = x[m * ldx + k + 2], a3 = x[m * ldx + k + 3];
            float *restrict row = acc + m * nb;
#pragma omp simd
            for (int64_t j = 0; j < nb; j++)
                row[j] += (a0 * w0[j] + a1 * w1[j]) + (a2 * w2[j] + a3 * w3[j]);
        }
    }
    for (; k < k1; k++) {
        const float *restrict w0 = W + k * N + n0;
        for (int64_t m = 0; m < M; m++) {
            const float a0 = x[m * ldx + k];
            float *restrict row = acc + m * nb;
#pragma omp simd
            for (int64_t j = 0; j < nb; j++) row[j] += a0 * w0[j];
        }
    }
}

/* Columns [c0, c1) over rows [k0, k1), written (not added) to out[m, c] with row stride ldo. */
static void band(int64_t M, int64_t k0, int64_t k1, int64_t N, int64_t c0, int64_t c1,
                 const float *restrict x, int64_t ldx, const float *restrict W,
                 float *restrict out, int64_t ldo) {
    float acc[BLOCK_FLOATS] __attribute__((aligned(64)));
    int64_t width = BLOCK_FLOATS / M;
    width -= width % 16;
    if (width < 16) width = 16;
    for (int64_t n0 = c0; n0 < c1; n0 += width) {
        const int64_t nb = min64(width, c1 - n0);
        memset(acc, 0, sizeof(float) * (size_t)(M * nb));
        accumulate(M, k0, k1, N, n0, nb, x, ldx, W, acc);
        for (int64_t m = 0; m < M; m++)
            memcpy(out + m * ldo + n0, acc + m * nb, sizeof(float) * (size_t)nb);
    }
}

void kvlens__matmul_team(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                         const float *W, const float *b, float *y, float *scratch, int t) {
    const int i = omp_get_thread_num();
    if (N >= SPLIT_COLUMNS_MIN * t) {
        if (i < t) {
            int64_t per = (N + t - 1) / t;
            per += (16 - per % 16) % 16;
            const int64_t c0 = min64(N, i * per), c1 = min64(N, c0 + per);
            band(M, 0, K, N, c0, c1, x, ldx, W, y, N);
            if (b)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = c0; n < c1; n++) y[m * N + n] += b[n];
        }
#pragma omp barrier
        return;
    }
    if (i < t) {
        const int64_t per = (K + t - 1) / t;
        const int64_t k0 = min64(K, i * per), k1 = min64(K, k0 + per);
        float *out = i == 0 ? y : scratch + (int64_t)(i - 1) * M * N;
        band(M, k0, k1, N, 0, N, x, ldx, W, out, N);
    }
    if (t > 1) {
#pragma omp barrier
    }
    if (i < t) {
        int64_t per_n = (N + t - 1) / t;
        const int64_t c0 = min64(N, i * per_n), c1 = min64(N, c0 + per_n);
        for (int64_t m = 0; m < M; m++) {
            float *restrict row = y + m * N;
            for (int p = 1; p < t; p++) {
                const float *restrict part = scratch + (int64_t)(p - 1) * M * N + m * N;
#pragma omp simd
                for (int64_t n = c0; n < c1; n++) row[n] += part[n];
            }
            if (b)
#pragma omp simd
                for (int64_t n = c0; n < c1; n++) row[n] += b[n];
        }
    }
#pragma omp barrier
}

/* y = x @ W (+ b). scratch holds (threads - 1) * M * N floats for the K split's partial sums.
 * M * 16 must not exceed BLOCK_FLOATS (M <= 512). */
void kvlens_matmul_small(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                         const float *W, const float *b, float *y, float *scratch,
                         int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    kvlens__matmul_team(M, K, N, x, ldx, W, b, y, scratch, omp_get_num_threads());
}

/* Floats of scratch kvlens_matmul_small needs for M rows, N columns and `threads` threads. */
int64_t kvlens_matmul_scratch(int64_t M, int64_t N, int threads) {
    return threads > 1 && N < SPLIT_COLUMNS_MIN * (int64_t)threads ? (threads - 1) * M * N : 0;
}
