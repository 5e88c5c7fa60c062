/* Attention of one new query per row over the cached keys and values (a decode step).
 *
 * Reads keys and values in place from the cache's [batch, kv_head, pos, d_head] storage (any
 * strides, d_head contiguous). The query heads that share a key head (grouped-query attention)
 * are handled together, so every key and value is read once per step. Work is split into chunks
 * of keys, so that two threads share even one row's few key heads; each chunk gives a partial
 * result (its maximum score, its sum of exponentials, its weighted values) and the partials of a
 * head are merged exactly, as in flash-decoding.
 *
 * Scores of 16 keys are reduced together with a shuffle tree, and the exponential is a
 * polynomial on 16 lanes (relative error about 2e-7), so the arithmetic runs on whole vectors.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4))); /* unaligned access */
typedef int32_t ivec16 __attribute__((vector_size(64)));

#define MAX_GROUP KVLENS_ATTENTION_MAX_GROUP /* query heads per key head handled together */
#define MAX_DHEAD KVLENS_ATTENTION_MAX_D_HEAD
#define CHUNK 256    /* keys per work item */

static inline vec16 splat(float a) { return (vec16){0} + a; }

/* Lanes 0-7: pairwise sums of a's lanes; lanes 8-15: of b's. (GCC's __builtin_shuffle, which
 * clang lacks; clang's __builtin_shufflevector takes the same lanes as constant arguments.) */
static inline vec16 pair_sums(vec16 a, vec16 b) {
#if defined(__clang__)
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                   30) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                   31);
#else
    const ivec16 even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const ivec16 odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
#endif
}

/* Lane j of the result: the sum of the lanes of t[j]. */
static inline vec16 lane_sums16(const vec16 t[16]) {
    vec16 u[8], w[4], x[2];
    for (int i = 0; i < 8; i++) u[i] = pair_sums(t[2 * i], t[2 * i + 1]);
    for (int i = 0; i < 4; i++) w[i] = pair_sums(u[2 * i], u[2 * i + 1]);
    for (int i = 0; i < 2; i++) x[i] = pair_sums(w[2 * i], w[2 * i + 1]);
    return pair_sums(x[0], x[1]);
}

/* exp(x) for x <= 0 on 16 lanes (0 below about -87, and for -inf). */
static inline vec16 exp16(vec16 x) {
    vec16 t = x * splat(1.44269504088896341f); /* exp(x) = 2^t = 2^n 2^f */
    const ivec16 low = t < splat(-127.0f); /* all ones where true */
    t = (vec16)((low & (ivec16)splat(-127.0f)) | (~low & (ivec16)t));
    const ivec16 n = __builtin_convertvector(t - splat(0.5f), ivec16); /* t <= 0: rounds t */
    const vec16 f = t - __builtin_convertvector(n, vec16);            /* in [-0.5, 0.5] */
    /* 2^f = exp(y), y = f ln 2, Taylor to degree 6: relative error below 2e-7. */
    const vec16 y = f * splat(0.69314718055994531f);
    vec16 p = splat(1.0f / 720.0f);
    p = p * y + splat(1.0f / 120.0f);
    p = p * y + splat(1.0f / 24.0f);
    p = p * y + splat(1.0f / 6.0f);
    p = p * y + splat(0.5f);
    p = p * y + splat(1.0f);
    p = p * y + splat(1.0f);
    return p * (vec16)((n + 127) << 23); /* times 2^n, built in the exponent bits; 2^-127 -> +0 */
}

typedef struct {
    int64_t group, d;
    const float *q;
    int64_t qs_b, qs_h;
    const float *k, *v;
    int64_t s_b, s_h, s_p;
    const uint8_t *mask;
    int64_t ms_b;
    float scale;
} problem;

/* One chunk [j0, j1) of key head g of row b, for its `group` query heads: writes the chunk's
 * maximum score, its sum of exp(score - maximum) and its exp-weighted sum of values. */
static void chunk(const problem *P, int64_t b, int64_t g, int64_t j0, int64_t j1, float *top,
                  float *total, float *acc /* [group][d] */) {
    const int64_t group = P->group, d = P->d, n = j1 - j0;
    const float *kb = P->k + b * P->s_b + g * P->s_h;
    const float *vb = P->v + b * P->s_b + g * P->s_h;
    const uint8_t *mb = P->mask ? P->mask + b * P->ms_b : 0;
    float scores[MAX_GROUP][CHUNK] __attribute__((aligned(64)));
    float qs[MAX_GROUP][MAX_DHEAD] __attribute__((aligned(64)));
    for (int64_t i = 0; i < group; i++) {
        const float *qi = P->q + b * P->qs_b + (g * group + i) * P->qs_h;
        for (int64_t c = 0; c < d; c++) qs[i][c] = qi[c] * P->scale;
    }
    const int vectors = d % 16 == 0;
    /* Scores. */
    for (int64_t j = 0; j < n; j += 16) {
        const int64_t m = n - j < 16 ? n - j : 16;
        for (int64_t i = 0; i < group; i++) {
            if (vectors) {
                vec16 part[16];
                for (int64_t r = 0; r < 16; r++) {
                    vec16 s = splat(0.0f);
                    if (r < m) {
                        const float *kr = kb + (j0 + j + r) * P->s_p;
                        for (int64_t c = 0; c < d; c += 16)
                            s += *(const vec16 *)(qs[i] + c) * *(const vec16u *)(kr + c);
                    }
                    part[r] = s;
                }
                const vec16 sums = lane_sums16(part);
                for (int64_t r = 0; r < m; r++) scores[i][j + r] = sums[r];
            } else {
                for (int64_t r = 0; r < m; r++) {
                    const float *kr = kb + (j0 + j + r) * P->s_p;
                    float s = 0.0f;
                    for (int64_t c = 0; c < d; c++) s += qs[i][c] * kr[c];
                    scores[i][j + r] = s;
                }
            }
        }
    }
    if (mb)
        for (int64_t j = 0; j < n; j++)
            if (!mb[j0 + j])
                for (int64_t i = 0; i < group; i++) scores[i][j] = -INFINITY;
    /* Softmax numerators, in place. */
    for (int64_t i = 0; i < group; i++) {
        float best = -INFINITY;
        for (int64_t j = 0; j < n; j++) best = scores[i][j] > best ? scores[i][j] : best;
        top[i] = best;
        float sum = 0.0f;
        if (best == -INFINITY) {
            memset(scores[i], 0, sizeof(float) * (size_t)n);
        } else {
            int64_t j = 0;
            for (; j + 16 <= n; j += 16) {
                vec16 e = exp16(*(vec16 *)(scores[i] + j) - splat(best));
                *(vec16 *)(scores[i] + j) = e;
                for (int r = 0; r < 16; r++) sum += e[r];
            }
            for (; j < n; j++) {
                scores[i][j] = expf(scores[i][j] - best);
                sum += scores[i][j];
            }
        }
        total[i] = sum;
    }
    /* Weighted values. */
    for (int64_t i = 0; i < group; i++) memset(acc + i * d, 0, sizeof(float) * (size_t)d);
    for (int64_t j = 0; j < n; j++) {
        const float *vr = vb + (j0 + j) * P->s_p;
        for (int64_t i = 0; i < group; i++) {
            const float p = scores[i][j];
            float *ai = acc + i * d;
            if (vectors)
                for (int64_t c = 0; c < d; c += 16)
                    *(vec16u *)(ai + c) += p * *(const vec16u *)(vr + c);
            else
                for (int64_t c = 0; c < d; c++) ai[c] += p * vr[c];
        }
    }
}

int64_t kvlens__attention_scratch(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                                  int64_t kv_len) {
    const int64_t group = n_heads / n_kv, chunks = (kv_len + CHUNK - 1) / CHUNK;
    return batch * n_kv * chunks * group * (d + 2);
}

void kvlens__attention_team(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                            int64_t kv_len, const float *q, int64_t qs_b, int64_t qs_h,
                            const float *k, const float *v, int64_t s_b, int64_t s_h,
                            int64_t s_p, const uint8_t *mask, int64_t ms_b, float scale,
                            float *out, float *lse, float *scratch) {
    const int64_t group = n_heads / n_kv;
    const int64_t chunks = (kv_len + CHUNK - 1) / CHUNK;
    const int64_t per_item = group * (d + 2);
    const problem P = {group, d, q, qs_b, qs_h, k, v, s_b, s_h, s_p, mask, ms_b, scale};
    const int64_t items = batch * n_kv * chunks;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t c = item % chunks, bg = item / chunks;
        const int64_t j0 = c * CHUNK, j1 = j0 + CHUNK < kv_len ? j0 + CHUNK : kv_len;
        float *part = scratch + item * per_item;
        chunk(&P, bg / n_kv, bg % n_kv, j0, j1, part, part + group, part + 2 * group);
    }
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < batch * n_kv; bg++) {
        for (int64_t i = 0; i < group; i++) {
            float best = -INFINITY;
            for (int64_t c = 0; c < chunks; c++) {
                const float t = scratch[(bg * chunks + c) * per_item + i];
                best = t > best ? t : best;
            }
            float *o = out + (bg * group + i) * d; /* bg * group + i = b * n_heads + h */
            memset(o, 0, sizeof(float) * (size_t)d);
            if (lse) lse[bg * group + i] = -INFINITY;
            if (best == -INFINITY) continue;
            float denominator = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                const float *part = scratch + (bg * chunks + c) * per_item;
                if (part[i] == -INFINITY) continue;
                const float w = expf(part[i] - best);
                denominator += w * part[group + i];
                const float *a = part + 2 * group + i * d;
                for (int64_t e = 0; e < d; e++) o[e] += w * a[e];
            }
            if (lse) lse[bg * group + i] = best + logf(denominator);
            const float inv = 1.0f / denominator;
            for (int64_t e = 0; e < d; e++) o[e] *= inv;
        }
    }
}

/* out[b, h, :] (contiguous [batch, n_heads, d]) = softmax attention of query q[b, h] over keys
 * [0, kv_len) of key head h / (n_heads / n_kv); mask[b, j] nonzero where allowed (or NULL);
 * a row with no allowed key gets zeros. lse[b, h] (contiguous, or NULL) gets the log-sum-exp
 * of the scaled scores (-inf for a row with no allowed key), for merging with other keys.
 * scratch: kvlens__attention_scratch(...) floats, batch * n_kv * ceil(kv_len / 256) * group *
 * (d + 2). Needs n_heads / n_kv <= 8 and d <= 256. */
void kvlens_decode_attention(int64_t batch, int64_t n_heads, int64_t n_kv, int64_t d,
                             int64_t kv_len, const float *q, int64_t qs_b, int64_t qs_h,
                             const float *k, const float *v, int64_t s_b, int64_t s_h,
                             int64_t s_p, const uint8_t *mask, int64_t ms_b, float scale,
                             float *out, float *lse, float *scratch, int threads) {
    const int64_t items = batch * n_kv * ((kv_len + CHUNK - 1) / CHUNK);
    if (items < threads) threads = (int)items;
#pragma omp parallel num_threads(threads)
    kvlens__attention_team(batch, n_heads, n_kv, d, kv_len, q, qs_b, qs_h, k, v, s_b, s_h, s_p,
                           mask, ms_b, scale, out, lse, scratch);
}
