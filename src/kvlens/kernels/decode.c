/* Small fused ops of a decode step, where torch's per-op cost exceeds the arithmetic.
 *
 * kvlens_rms_norm: y = x / sqrt(mean(x^2) + eps) * w over the last axis, a few rows.
 * kvlens_decode_attention: one new query per row against the cached keys and values, read in
 * place from the cache's [batch, kv_head, pos, d_head] storage (any strides), grouped-query heads
 * reading their shared key head once, with an optional per-row key mask.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

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

#define MAX_GROUP 16

/* q[b, h, :] at q + b*qs_b + h*qs_h; keys/values [b, g, j, :] at base + b*s_b + g*s_h + j*s_p;
 * mask[b, j] (nonzero: may attend) at mask + b*ms_b + j, or NULL; out[b, h, :] contiguous
 * [batch, n_heads, d]. scratch: batch * n_heads * kv_len floats. Query head h reads key head
 * h / (n_heads / n_kv). A row whose mask allows no key gets zeros. */
void kvlens_decode_attention(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                             int64_t kv_len, const float *q, int64_t qs_b, int64_t qs_h,
                             const float *k, const float *v, int64_t s_b, int64_t s_h,
                             int64_t s_p, const uint8_t *mask, int64_t ms_b, float scale,
                             float *out, float *scratch, int threads) {
    const int64_t group = n_heads / n_kv;
    const int64_t items = batch * n_kv;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t b = item / n_kv, g = item % n_kv;
        const float *restrict kb = k + b * s_b + g * s_h;
        const float *restrict vb = v + b * s_b + g * s_h;
        const uint8_t *mb = mask ? mask + b * ms_b : 0;
        float *scores = scratch + (b * n_heads + g * group) * kv_len;
        float top[MAX_GROUP], total[MAX_GROUP];
        const float *qh[MAX_GROUP];
        for (int64_t i = 0; i < group; i++) {
            qh[i] = q + b * qs_b + (g * group + i) * qs_h;
            top[i] = -INFINITY;
        }
        for (int64_t j = 0; j < kv_len; j++) {
            const float *restrict kj = kb + j * s_p;
            const int allowed = !mb || mb[j];
            for (int64_t i = 0; i < group; i++) {
                float s = 0.0f;
                const float *restrict qi = qh[i];
#pragma omp simd reduction(+ : s)
                for (int64_t c = 0; c < d; c++) s += qi[c] * kj[c];
                s = allowed ? s * scale : -INFINITY;
                scores[i * kv_len + j] = s;
                if (s > top[i]) top[i] = s;
            }
        }
        for (int64_t i = 0; i < group; i++) {
            float *restrict si = scores + i * kv_len;
            float sum = 0.0f;
            if (top[i] == -INFINITY) {
                for (int64_t j = 0; j < kv_len; j++) si[j] = 0.0f;
            } else {
                for (int64_t j = 0; j < kv_len; j++) {
                    si[j] = expf(si[j] - top[i]);
                    sum += si[j];
                }
            }
            total[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
            float *restrict oi = out + (b * n_heads + g * group + i) * d;
            for (int64_t c = 0; c < d; c++) oi[c] = 0.0f;
        }
        for (int64_t j = 0; j < kv_len; j++) {
            const float *restrict vj = vb + j * s_p;
            for (int64_t i = 0; i < group; i++) {
                const float p = scores[i * kv_len + j];
                float *restrict oi = out + (b * n_heads + g * group + i) * d;
#pragma omp simd
                for (int64_t c = 0; c < d; c++) oi[c] += p * vj[c];
            }
        }
        for (int64_t i = 0; i < group; i++) {
            float *restrict oi = out + (b * n_heads + g * group + i) * d;
            for (int64_t c = 0; c < d; c++) oi[c] *= total[i];
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

/* Gated MLP activation: out[r, i] = silu(gate_up[r, i]) * gate_up[r, d + i], rows of 2d. */
void kvlens_silu_mul(int64_t rows, int64_t d, const float *gate_up, int64_t ld, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict g = gate_up + r * ld;
        const float *restrict u = g + d;
        float *restrict o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
