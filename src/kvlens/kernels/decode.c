/* Small fused ops of a decode step, where torch's per-op cost exceeds the arithmetic.
 *
 * Each replaces several torch calls on a few rows (a decode step), where the per-call cost of
 * torch ops exceeds their arithmetic: RMSNorm with its scale, rotary position embedding in place,
 * and the gated MLP's SiLU-times-input.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"

void kvlens_rms_norm(int64_t rows, int64_t d, const float *x, int64_t ldx, const float *w,
                     float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * ldx;
        float *restrict yr = y + r * d;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < d; i++) sum += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(sum / (float)d + eps);
        if (w) {
#pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] * inv) * w[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * inv;
        }
    }
}

/* Rotary position embedding in place on rows of heads: x[r, h, :] at x + r*xs_r + h*xs_h,
 * angles cos/sin[r, :half] at cos + r*cs_r (a stride of 0 broadcasts one row). Pairs are
 * (i, i + half) or, with adjacent, (2i, 2i + 1); dimensions past 2 * half are left alone. */
void kvlens_rotary_inplace(int64_t rows, int64_t heads, int64_t half, float *x, int64_t xs_r,
                           int64_t xs_h, const float *cos, const float *sin, int64_t cs_r,
                           int adjacent) {
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict c = cos + r * cs_r;
        const float *restrict s = sin + r * cs_r;
        for (int64_t h = 0; h < heads; h++) {
            float *restrict xh = x + r * xs_r + h * xs_h;
            if (adjacent) {
                for (int64_t i = 0; i < half; i++) {
                    const float a = xh[2 * i], b = xh[2 * i + 1];
                    xh[2 * i] = a * c[i] - b * s[i];
                    xh[2 * i + 1] = b * c[i] + a * s[i];
                }
            } else {
                float *restrict lo = xh;
                float *restrict hi = xh + half;
#pragma omp simd
                for (int64_t i = 0; i < half; i++) {
                    const float a = lo[i], b = hi[i];
                    lo[i] = a * c[i] - b * s[i];
                    hi[i] = b * c[i] + a * s[i];
                }
            }
        }
    }
}

/* Gated MLP activation: out[r, i] = silu(gate[r, i]) * up[r, i], rows ldg and ldu apart. */
void kvlens_silu_mul(int64_t rows, int64_t d, const float *gate, int64_t ldg, const float *up,
                     int64_t ldu, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict g = gate + r * ldg;
        const float *restrict u = up + r * ldu;
        float *restrict o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* LayerNorm with scale and bias: y = (x - mean) / sqrt(var + eps) * w + b over rows of d. */
void kvlens_layer_norm(int64_t rows, int64_t d, const float *x, int64_t ldx, const float *w,
                       const float *b, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * ldx;
        float *restrict yr = y + r * d;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < d; i++) sum += xr[i];
        const float mean = sum / (float)d;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < d; i++) squares += (xr[i] - mean) * (xr[i] - mean);
        const float inv = 1.0f / sqrtf(squares / (float)d + eps);
#pragma omp simd
        for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
    }
}

/* out[r, i] = act(x[r, i]) for the plain MLP's activations (kind: KVLENS_ACT_*). */
void kvlens_activation(int64_t rows, int64_t d, const float *x, int64_t ldx, float *out,
                       int kind) {
    const float root_half = 0.70710678118654752f, root_two_over_pi = 0.79788456080286536f;
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * ldx;
        float *restrict o = out + r * d;
        switch (kind) {
        case KVLENS_ACT_GELU:
            for (int64_t i = 0; i < d; i++) o[i] = 0.5f * xr[i] * (1.0f + erff(xr[i] * root_half));
            break;
        case KVLENS_ACT_GELU_TANH:
            for (int64_t i = 0; i < d; i++) {
                const float v = xr[i];
                o[i] = 0.5f * v * (1.0f + tanhf(root_two_over_pi * (v + 0.044715f * v * v * v)));
            }
            break;
        case KVLENS_ACT_RELU:
            for (int64_t i = 0; i < d; i++) o[i] = xr[i] > 0.0f ? xr[i] : 0.0f;
            break;
        default: /* KVLENS_ACT_SILU */
            for (int64_t i = 0; i < d; i++) o[i] = xr[i] / (1.0f + expf(-xr[i]));
        }
    }
}
