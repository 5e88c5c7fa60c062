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
 * W is read by one thread, for up to 8 rows of x at a time; each (row of x, row of W) sum runs
 * block by block into two vectors of 16 lanes (FMA of the exactly decoded weights with x), added
 * in a fixed tree at the end. So a value of y depends only on its row of x and its row of W: equal
 * bitwise whatever M, the thread count or the split. With AVX-512 a 4-bit block is decoded by
 * table lookup (weights()), and several rows of W or of x go through the loop together so that
 * each block's decoding and each load of x serve several sums.
 * kvlens_qdequantize: rows [r0, r0 + R) of W as fp32 [R, K], for products on many rows (a
 * prefill dequantizes a tile at a time and multiplies it with torch).
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type numbers, as GGUF stores them */
#define QK 32

static inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

#if defined(__AVX512F__)
/* scales() converts the halves 16 at a time */
#elif defined(__F16C__)
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

/* Bytes of a block; a constant where `type` is (kvlens_qblock_bytes, exported, cannot be inlined
 * in a shared library). */
static inline int64_t block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    default: return 0;
    }
}

int64_t kvlens_qblock_bytes(int type) { return block_bytes(type); }

/* Blocks are taken in chunks of up to CHUNK along a row: the chunk's scales are converted to fp32
 * all at once into a small array first (one vector conversion for 8 or 16 blocks instead of a
 * scalar conversion and a broadcast per block), and each block then reads its scale from there as
 * a broadcast from memory, which costs no shuffle. */
enum { CHUNK = 16 };
/* Rows of x taken at a time: 8 keep 16 accumulators in AVX-512's 32 registers. */
enum { GROUP = 8 };
/* Each block asks for the bytes this far ahead of it (software prefetch): the hardware
 * prefetcher alone left the loop waiting on memory (a decode step's products: 22 -> 16 ms on one
 * thread here). About ten rows of a 576-wide Q4_1 matrix. */
enum { AHEAD = 4096 };

/* 16 fp32 lanes: an AVX-512 register with intrinsics where the compiler targets AVX-512, else a
 * GCC/clang vector (four NEON registers on aarch64, two AVX2 ones) filled by plain loops that
 * both compilers vectorize. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 lanes;
#define ZERO() _mm512_setzero_ps()
#define LOAD(p) _mm512_loadu_ps(p)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ADD(a, b) _mm512_add_ps(a, b)

/* The fp32 scales of blocks b[0], b[bb], ... b[(n - 1) bb] (n <= CHUNK): for Q4_1 d and m of
 * block j at s[2 j] and s[2 j + 1], else d at s[j]. One gather fetches the first 4 bytes of each
 * block (d and m, or d and two bytes of the block's own q) and one or two conversions turn 16
 * halves into fp32. Gathering them with scalar moves into a buffer instead cost a third of the
 * loop's time (the vector load of the buffer waits for the scalar stores to complete). */
static inline __attribute__((always_inline)) void scales(int type, const uint8_t *b, int64_t bb,
                                                         int64_t n, float *restrict s) {
    const __m512i at = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)bb)); /* a constant where inlined */
    const __mmask16 blocks = (__mmask16)((1u << n) - 1); /* no access past the n-th block */
    const __m512i raw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), blocks, at, b, 1);
    if (type == Q4_1) {
        _mm512_storeu_ps(s, _mm512_cvtph_ps(_mm512_castsi512_si256(raw)));
        if (n > 8) _mm512_storeu_ps(s + 16, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(raw, 1)));
        return;
    }
    _mm512_storeu_ps(s, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw))); /* each d: low half */
}

static inline __m128i bytes16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }

/* The 32 weights of one block (weights 0..15 and 16..31), bitwise as ggml decodes them; s: its
 * scales as scales() left them. A 4-bit block's 16 possible weights are one vector (the table
 * d * q + m, or (q - 8) * d, one multiply for the block), and each weight is a lookup in it by its
 * nibble: vpermps reads only the low 4 bits of each index, so the low nibbles need no mask and the
 * high ones one shift, and nothing is converted from integers. Q8_0 converts its int8s. */
static inline __attribute__((always_inline)) void weights(int type, const uint8_t *restrict b,
                                                          const float *restrict s, lanes *lo,
                                                          lanes *hi) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    if (type == Q8_0) {
        const __m512 d = _mm512_set1_ps(s[0]);
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(b + 2))), d);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(b + 18))), d);
        return;
    }
    __m512 table;
    const __m512i q = _mm512_cvtepu8_epi32(bytes16(b + (type == Q4_1 ? 4 : 2)));
    if (type == Q4_0) /* (q - 8) * d, as ggml: -0.0 where q = 8 and d < 0 */
        table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0f)), _mm512_set1_ps(s[0]));
    else /* d * q is exact, so the fused d * q + m rounds as ggml's */
        table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]));
    *lo = _mm512_permutexvar_ps(q, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

/* The 16 lanes of each of a, b, c, d added in one fixed tree: lane j with j + 8, then with
 * j + 4, j + 2, j + 1. Four vectors go through it together (the first two steps pair halves and
 * quarters of different vectors), which takes a third of the shuffles and adds of four separate
 * trees; each vector's sum is the same whichever of the four places it takes. */
static inline void sums4(lanes a, lanes b, lanes c, lanes d, float out[4]) {
    /* 128-bit quarters: ab = a's (0, 1) + (2, 3), then b's; cd likewise */
    const __m512 ab = ADD(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    const __m512 cd = ADD(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
    /* quarter i: the i-th vector's 4 partial sums */
    __m512 v = ADD(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));
    float l[16];
    _mm512_storeu_ps(l, v);
    for (int i = 0; i < 4; i++) out[i] = l[4 * i];
}
#else
typedef float lanes __attribute__((vector_size(64)));
#define ZERO() ((lanes){0})
#define FMA(a, b, c) ((a) * (b) + (c))
#define ADD(a, b) ((a) + (b))
#define SPLAT(v) ((lanes){0} + (v))
static inline lanes LOAD(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void scales(int type, const uint8_t *b, int64_t bb, int64_t n, float *restrict s) {
    for (int64_t j = 0; j < n; j++) {
        if (type == Q4_1) {
            s[2 * j] = half_to_float(b + j * bb);
            s[2 * j + 1] = half_to_float(b + j * bb + 2);
        } else {
            s[j] = half_to_float(b + j * bb);
        }
    }
}
static inline void nibbles(const uint8_t *p, lanes *low, lanes *high) { /* of 16 bytes */
    float f[16], g[16];
#pragma omp simd
    for (int j = 0; j < 16; j++) {
        f[j] = (float)(p[j] & 15);
        g[j] = (float)(p[j] >> 4);
    }
    memcpy(low, f, sizeof f);
    memcpy(high, g, sizeof g);
}
static inline lanes int8s(const uint8_t *p) { /* 16 signed bytes */
    float f[16];
    lanes v;
#pragma omp simd
    for (int j = 0; j < 16; j++) f[j] = (float)(int8_t)p[j];
    memcpy(&v, f, sizeof v);
    return v;
}
/* The 32 weights of one block (weights 0..15 and 16..31), bitwise as ggml decodes them. */
static inline __attribute__((always_inline)) void weights(int type, const uint8_t *restrict b,
                                                          const float *restrict s, lanes *lo,
                                                          lanes *hi) {
    const lanes vd = SPLAT(s[0]);
    if (type == Q8_0) {
        *lo = int8s(b + 2) * vd;
        *hi = int8s(b + 18) * vd;
        return;
    }
    lanes low, high;
    if (type == Q4_0) { /* (q - 8) * d, as ggml: -0.0 where q = 8 and d < 0 */
        nibbles(b + 2, &low, &high);
        *lo = (low - SPLAT(8.0f)) * vd;
        *hi = (high - SPLAT(8.0f)) * vd;
        return;
    }
    nibbles(b + 4, &low, &high); /* d * q is exact: d * q + m rounds once, fused or not */
    *lo = FMA(low, vd, SPLAT(s[1]));
    *hi = FMA(high, vd, SPLAT(s[1]));
}
/* The 16 lanes of each of a, b, c, d added in one fixed order. */
static inline float lanes_sum(lanes v) {
    float l[16];
    memcpy(l, &v, sizeof l);
    float s = 0.0f;
    for (int j = 0; j < 16; j += 4) s += (l[j] + l[j + 1]) + (l[j + 2] + l[j + 3]);
    return s;
}
static inline void sums4(lanes a, lanes b, lanes c, lanes d, float out[4]) {
    out[0] = lanes_sum(a);
    out[1] = lanes_sum(b);
    out[2] = lanes_sum(c);
    out[3] = lanes_sum(d);
}
#endif

/* R output rows (from `row`, row_bytes apart) times rows x[0 .. C) (ldx apart): y[m * ldy + r]
 * for r < R, m < C. Every (row of x, row of W) pair has its own two accumulators (the blocks'
 * first and second halves) that take the blocks in order, then are added and summed in a fixed
 * tree: the same operations whatever R and C, so a value of y depends only on its two rows. R and
 * C are constants where this is inlined, so the R * C pairs' accumulators live in registers:
 * several independent chains of multiply-adds, and each block's weights decoded once for C rows
 * of x, each x vector loaded once for R rows of W. */
static inline __attribute__((always_inline)) void tile(int type, int R, int C, int64_t nb,
                                                       const uint8_t *restrict row,
                                                       int64_t row_bytes,
                                                       const float *restrict x, int64_t ldx,
                                                       float *restrict y, int64_t ldy) {
    const int64_t bb = block_bytes(type);
    const int per = type == Q4_1 ? 2 : 1; /* scales per block */
    lanes lo[4][8], hi[4][8];
    float s[4][2 * CHUNK];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < C; m++) lo[r][m] = hi[r][m] = ZERO();
    const int64_t step = (nb + (nb + CHUNK - 1) / CHUNK - 1) / ((nb + CHUNK - 1) / CHUNK);
    for (int64_t k0 = 0; k0 < nb; k0 += step) { /* chunks of equal size (18 blocks: 9 and 9) */
        const int64_t n = lesser(step, nb - k0);
        for (int r = 0; r < R; r++) scales(type, row + r * row_bytes + k0 * bb, bb, n, s[r]);
        for (int64_t k = k0; k < k0 + n; k++) {
            for (int r = 0; r < R; r++) {
                lanes wl, wh;
                __builtin_prefetch(row + r * row_bytes + k * bb + AHEAD, 0, 3);
                weights(type, row + r * row_bytes + k * bb, s[r] + (k - k0) * per, &wl, &wh);
                for (int m = 0; m < C; m++) {
                    lo[r][m] = FMA(LOAD(x + m * ldx + k * QK), wl, lo[r][m]);
                    hi[r][m] = FMA(LOAD(x + m * ldx + k * QK + 16), wh, hi[r][m]);
                }
            }
        }
    }
    lanes v[4 * 8 + 3]; /* the R * C pairs' vectors, in fours (zeros past the end) */
    for (int i = 0; i < R * C; i++) v[i] = ADD(lo[i / C][i % C], hi[i / C][i % C]);
    for (int i = R * C; i < R * C + 3; i++) v[i] = ZERO();
    for (int i = 0; i < R * C; i += 4) {
        float sum[4];
        sums4(v[i], v[i + 1], v[i + 2], v[i + 3], sum);
        for (int j = i; j < i + 4 && j < R * C; j++) y[j % C * ldy + j / C] = sum[j - i];
    }
}

/* Rows x[0 .. C) against W's rows [o0, o1): R rows of W at a time, the last few one by one. */
static inline __attribute__((always_inline)) void band(int type, int R, int C, int64_t nb,
                                                       int64_t o0, int64_t o1,
                                                       const uint8_t *restrict W,
                                                       const float *restrict x, int64_t ldx,
                                                       float *restrict y, int64_t ldy) {
    const int64_t row_bytes = nb * block_bytes(type);
    int64_t o = o0;
    for (; o + R <= o1; o += R)
        tile(type, R, C, nb, W + o * row_bytes, row_bytes, x, ldx, y + o, ldy);
    for (; o < o1; o++) tile(type, 1, C, nb, W + o * row_bytes, row_bytes, x, ldx, y + o, ldy);
}

/* One thread's outputs [o0, o1) for all M rows of x: the rows of x in groups of up to 8 (more
 * accumulators than registers beyond), and with one or two rows of x, four or two rows of W at a
 * time, to keep at least eight chains of multiply-adds going. */
static inline __attribute__((always_inline)) void rows_of(int type, int64_t M, int64_t K,
                                                          int64_t o0, int64_t o1,
                                                          const uint8_t *restrict W,
                                                          const float *restrict x, int64_t ldx,
                                                          const float *restrict bias,
                                                          float *restrict y, int64_t ldy) {
    const int64_t nb = K / QK;
    for (int64_t m = 0; m < M; m += GROUP) {
        const float *xm = x + m * ldx;
        float *ym = y + m * ldy;
        switch (lesser(GROUP, M - m)) {
        case 1: band(type, 4, 1, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        case 2: band(type, 2, 2, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        case 3: band(type, 1, 3, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        case 4: band(type, 1, 4, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        case 5: band(type, 1, 5, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        case 6: band(type, 1, 6, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        case 7: band(type, 1, 7, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        default: band(type, 1, 8, nb, o0, o1, W, xm, ldx, ym, ldy); break;
        }
    }
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = o0; o < o1; o++) y[m * ldy + o] += bias[o];
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
    if (M < 1 || M > KVLENS_MAX_ROWS || K < QK || K % QK || N < 1 || !block_bytes(type))
        return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    kvlens__qmatmul_team(M, K, N, type, W, x, ldx, bias, y, ldy, omp_get_num_threads());
    return 0;
}

/* One row of W (nb blocks) as fp32. */
static inline __attribute__((always_inline)) void dequantize_row(int type, const uint8_t *row,
                                                                 int64_t nb, float *out) {
    const int64_t bb = block_bytes(type);
    const int per = type == Q4_1 ? 2 : 1;
    float s[2 * CHUNK];
    for (int64_t k0 = 0; k0 < nb; k0 += CHUNK) {
        const int64_t n = lesser(CHUNK, nb - k0);
        scales(type, row + k0 * bb, bb, n, s);
        for (int64_t k = k0; k < k0 + n; k++) {
            lanes lo, hi;
            weights(type, row + k * bb, s + (k - k0) * per, &lo, &hi);
            memcpy(out + k * QK, &lo, sizeof lo);
            memcpy(out + k * QK + 16, &hi, sizeof hi);
        }
    }
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
        switch (type) {
        case Q4_0: dequantize_row(Q4_0, row, nb, out + r * K); break;
        case Q4_1: dequantize_row(Q4_1, row, nb, out + r * K); break;
        default: dequantize_row(Q8_0, row, nb, out + r * K); break;
        }
    }
    return 0;
}
