/* Products and dequantization on ggml's 4- and 8-bit weight blocks, activations in fp32.
 *
 * A quantized weight is kept as the GGUF file stores it: [N, K] (output rows, each a row of
 * blocks along K), every block 32 weights:
 *   Q8_0 (34 bytes): fp16 scale d, then 32 int8 q; weight = d * q.
 *   Q4_0 (18 bytes): fp16 d, then 16 bytes; byte j holds weight j (low nibble) and weight j + 16
 *                    (high nibble); weight = d * (q - 8).
 *   Q4_1 (20 bytes): fp16 d, fp16 m, then 16 bytes as Q4_0; weight = d * q + m.
 * A block decoded to fp32 is bitwise ggml's (d * q is exact in fp32, so d * q + m rounds once,
 * fused or not), so a product here is the product with the dequantized fp32 matrix up to the
 * order of its additions.
 *
 * kvlens_qmatmul: y[M, N] = x[M, K] @ W^T (+ b) for a decode step's few rows. Each output row of
 * W is read once, by one thread, for all M rows of x; its sum runs block by block into two
 * vectors of 16 lanes, added in a fixed order at the end. So a value of y depends only on its row
 * of x and its row of W: equal bitwise whatever M, the thread count or the split.
 * kvlens_qdequantize: rows [r0, r0 + R) of W as fp32 [R, K], for products on many rows (a
 * prefill dequantizes a tile at a time and multiplies it with torch).
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type numbers, as GGUF stores them */
#define QK 32

static inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h); /* little-endian, as x86 */
    return _cvtsh_ss(h);
}
#else
static inline float half_to_float(const uint8_t *p) {
    const uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact */
        f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? sign | 0x7f800000u | (man << 13)
                                    : sign | ((exp + 112u) << 23) | (man << 13);
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

int64_t kvlens_qblock_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    default: return 0;
    }
}

/* 16 fp32 lanes: an AVX-512 register with intrinsics where the compiler targets AVX-512, else a
 * GCC/clang vector (four NEON registers on aarch64, two AVX2 ones) filled by plain loops that
 * both compilers vectorize. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 lanes;
#define ZERO() _mm512_setzero_ps()
#define LOAD(p) _mm512_loadu_ps(p)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SPLAT(v) _mm512_set1_ps(v)
static inline void nibbles(const uint8_t *p, lanes *low, lanes *high) { /* of 16 bytes */
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *low = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *high = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
static inline lanes int8s(const uint8_t *p) { /* 16 signed bytes */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
typedef float lanes __attribute__((vector_size(64)));
#define ZERO() ((lanes){0})
#define FMA(a, b, c) ((a) * (b) + (c))
#define SPLAT(v) ((lanes){0} + (v))
static inline lanes LOAD(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void nibbles(const uint8_t *p, lanes *low, lanes *high) {
    float f[16], g[16];
#pragma omp simd
    for (int j = 0; j < 16; j++) {
        f[j] = (float)(p[j] & 15);
        g[j] = (float)(p[j] >> 4);
    }
    memcpy(low, f, sizeof f);
    memcpy(high, g, sizeof g);
}
static inline lanes int8s(const uint8_t *p) {
    float f[16];
    lanes v;
#pragma omp simd
    for (int j = 0; j < 16; j++) f[j] = (float)(int8_t)p[j];
    memcpy(&v, f, sizeof v);
    return v;
}
#endif

/* The 32 weights of one block as two vectors (weights 0..15 and 16..31). `type` is a constant
 * where this is inlined. */
static inline __attribute__((always_inline)) void decode(int type, const uint8_t *restrict b,
                                                         lanes *lo, lanes *hi) {
    const float d = half_to_float(b);
    if (type == Q8_0) {
        *lo = int8s(b + 2) * SPLAT(d);
        *hi = int8s(b + 18) * SPLAT(d);
        return;
    }
    const lanes vd = SPLAT(d);
    lanes low, high;
    if (type == Q4_0) { /* (q - 8) * d, as ggml: -0.0 where q = 8 and d < 0 */
        nibbles(b + 2, &low, &high);
        *lo = (low - SPLAT(8.0f)) * vd;
        *hi = (high - SPLAT(8.0f)) * vd;
        return;
    }
    const lanes m = SPLAT(half_to_float(b + 2));
    nibbles(b + 4, &low, &high);
    *lo = FMA(low, vd, m);
    *hi = FMA(high, vd, m);
}

/* The 32 lanes of two accumulators added in one fixed order. */
static inline float lanes_sum(lanes a, lanes b) {
    float l[16], h[16];
    memcpy(l, &a, sizeof l);
    memcpy(h, &b, sizeof h);
    float s = 0.0f;
    for (int j = 0; j < 16; j += 4)
        s += ((l[j] + h[j]) + (l[j + 1] + h[j + 1])) + ((l[j + 2] + h[j + 2]) + (l[j + 3] + h[j + 3]));
    return s;
}

/* y[m * ldy + o] for o in [o0, o1): one thread's outputs. Two accumulators a row (the blocks'
 * first and second halves) make two independent chains of multiply-adds. */
static inline __attribute__((always_inline)) void rows_of(int type, int64_t M, int64_t K,
                                                          int64_t o0, int64_t o1,
                                                          const uint8_t *restrict W,
                                                          const float *restrict x, int64_t ldx,
                                                          const float *restrict bias,
                                                          float *restrict y, int64_t ldy) {
    const int64_t nb = K / QK, bb = kvlens_qblock_bytes(type), row_bytes = nb * bb;
    lanes acc[2 * KVLENS_MAX_ROWS];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *restrict row = W + o * row_bytes;
        if (M == 1) { /* one row: the accumulators stay in registers */
            lanes a0 = ZERO(), a1 = ZERO();
            for (int64_t k = 0; k < nb; k++) {
                lanes lo, hi;
                decode(type, row + k * bb, &lo, &hi);
                a0 = FMA(LOAD(x + k * QK), lo, a0);
                a1 = FMA(LOAD(x + k * QK + 16), hi, a1);
            }
            const float s = lanes_sum(a0, a1);
            y[o] = bias ? s + bias[o] : s;
            continue;
        }
        for (int64_t m = 0; m < 2 * M; m++) acc[m] = ZERO();
        for (int64_t k = 0; k < nb; k++) {
            lanes lo, hi;
            decode(type, row + k * bb, &lo, &hi);
            for (int64_t m = 0; m < M; m++) {
                const float *a = x + m * ldx + k * QK;
                acc[2 * m] = FMA(LOAD(a), lo, acc[2 * m]);
                acc[2 * m + 1] = FMA(LOAD(a + 16), hi, acc[2 * m + 1]);
            }
        }
        for (int64_t m = 0; m < M; m++) {
            const float s = lanes_sum(acc[2 * m], acc[2 * m + 1]);
            y[m * ldy + o] = bias ? s + bias[o] : s;
        }
    }
}

/* The first t threads of a running team share the outputs, in contiguous bands of 16. */
void kvlens__qmatmul_team(int64_t M, int64_t K, int64_t N, int type, const uint8_t *W,
                          const float *x, int64_t ldx, const float *bias, float *y, int64_t ldy,
                          int t) {
    const int id = omp_get_thread_num();
    if (id < t) {
        const int64_t groups = (N + 15) / 16;
        const int64_t o0 = lesser(N, groups * id / t * 16);
        const int64_t o1 = lesser(N, groups * (id + 1) / t * 16);
        switch (type) {
        case Q4_0: rows_of(Q4_0, M, K, o0, o1, W, x, ldx, bias, y, ldy); break;
        case Q4_1: rows_of(Q4_1, M, K, o0, o1, W, x, ldx, bias, y, ldy); break;
        default: rows_of(Q8_0, M, K, o0, o1, W, x, ldx, bias, y, ldy); break;
        }
    }
#pragma omp barrier
}

/* y = x @ W^T (+ bias); 0 on success, -1 for arguments outside the kernel's limits. */
int kvlens_qmatmul(int64_t M, int64_t K, int64_t N, int type, const uint8_t *W, const float *x,
                   int64_t ldx, const float *bias, float *y, int64_t ldy, int threads) {
    if (M < 1 || M > KVLENS_MAX_ROWS || K < QK || K % QK || N < 1 || !kvlens_qblock_bytes(type))
        return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    kvlens__qmatmul_team(M, K, N, type, W, x, ldx, bias, y, ldy, omp_get_num_threads());
    return 0;
}

/* out[R, K] = rows r0 .. r0 + R of W as fp32; 0 on success, -1 outside the limits. */
int kvlens_qdequantize(int64_t K, int type, const uint8_t *W, int64_t r0, int64_t R, float *out,
                       int threads) {
    if (K < QK || K % QK || R < 0 || r0 < 0 || !kvlens_qblock_bytes(type)) return -1;
    const int64_t nb = K / QK, bb = kvlens_qblock_bytes(type);
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint8_t *row = W + (r0 + r) * nb * bb;
        for (int64_t k = 0; k < nb; k++) {
            lanes lo, hi;
            switch (type) {
            case Q4_0: decode(Q4_0, row + k * bb, &lo, &hi); break;
            case Q4_1: decode(Q4_1, row + k * bb, &lo, &hi); break;
            default: decode(Q8_0, row + k * bb, &lo, &hi); break;
            }
            memcpy(out + r * K + k * QK, &lo, sizeof lo);
            memcpy(out + r * K + k * QK + 16, &hi, sizeof hi);
        }
    }
    return 0;
}
