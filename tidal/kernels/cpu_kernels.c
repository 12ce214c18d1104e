/* The CPU kernels (float32), built and loaded by tidal/kernels/cpu_native.py:
 *   tidal_paged_decode_f32   decode attention read straight from the block table;
 *   tidal_rope_f32           neox RoPE of the q and k heads of the fused qkv projection;
 *   tidal_silu_mul_f32       SiLU(gate) * up of the fused gate_up projection.
 * Every row's result depends only on that row's inputs, in a fixed order, so a caller can split
 * rows across threads and a row's bits do not depend on the batch.
 *
 * Decode attention. Layouts (all contiguous):
 *   q, out        [B, Hq, D]
 *   k_cache       [num_blocks, block_size, Hkv, D]   (one layer's keys; v_cache the same)
 *   block_tables  [B, bt_stride] int32, seq_lens [B] int32
 * Rows [row_begin, row_end) are computed. For each sequence and KV head, the Hq / Hkv query heads
 * that share it are done together: each key and value row is read once for the whole group. When
 * head_dim is a multiple of 16 (every model Tidal runs), one pass over the context with an online
 * softmax, 16 tokens at a time, in 16-float vectors; otherwise two scalar passes (scores, then
 * softmax and the weighted values).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_DIM 256

/* 16-float vectors (GCC/Clang vector extensions: AVX-512 registers where the CPU has them, two
 * AVX2 registers otherwise). v16u is the unaligned view used to load rows of the cache. */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* One level of the 16 x 16 transpose-reduce: a and b hold per-token partial sums in segments of
 * 2w lanes; the result holds each segment's two halves added, a's and b's segments interleaved
 * (w lanes each). Four levels (w = 8, 4, 2, 1) turn 16 vectors of partials into one vector of
 * 16 sums, whose lane i holds the vector that went in at position bitrev4(i). */
#define REDUCE(a, b, lo, hi) (__builtin_shuffle((a), (b), (v16i)lo) + __builtin_shuffle((a), (b), (v16i)hi))
#define L8 {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
#define H8 {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}
#define L4 {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}
#define H4 {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}
#define L2 {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}
#define H2 {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}
#define L1 {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}
#define H1 {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}
static const int BITREV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline v16 sum_each(const v16 *p) {
    v16 r1[8], r2[4], r3[2];
    for (int i = 0; i < 8; i++) r1[i] = REDUCE(p[2 * i], p[2 * i + 1], L8, H8);
    for (int i = 0; i < 4; i++) r2[i] = REDUCE(r1[2 * i], r1[2 * i + 1], L4, H4);
    for (int i = 0; i < 2; i++) r3[i] = REDUCE(r2[2 * i], r2[2 * i + 1], L2, H2);
    return REDUCE(r3[0], r3[1], L1, H1);
}

/* exp(x) of 16 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial in r,
 * times 2^n), within 2 ulp of expf for x in [-87, 88]; smaller x (-inf included) gives 0, larger
 * x gives exp(88). */
static inline v16 exp_v16(v16 x) {
    const v16 lo = (v16){0} - 87.0f, hi = (v16){0} + 88.0f;
    const v16i underflow = x < lo;
    x = (v16)(((v16i)x & ~underflow) | ((v16i)lo & underflow));
    const v16i overflow = x > hi;
    x = (v16)(((v16i)x & ~overflow) | ((v16i)hi & overflow));
    const v16 magic = (v16){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const v16 n = (x * 1.44269504088896341f + magic) - magic;
    const v16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    v16 p = (v16){0} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    /* 2^n in two halves: n reaches 127 at x = 88, past the largest exponent a float holds */
    const v16i half = __builtin_convertvector(n, v16i) >> 1;
    const v16 a = (v16)((half + 127) << 23), b = (v16)((__builtin_convertvector(n, v16i) - half + 127) << 23);
    return (v16)((v16i)(p * a * b) & ~underflow);
}

static inline float max_lanes(v16 x) {
    float m = x[0];
    for (int i = 1; i < 16; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline float sum_lanes(v16 x) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += x[i];
    return s;
}

/* One sequence and KV head when dim = 16 * CHUNKS: the `group` query heads that share the head,
 * in one pass over the context with an online softmax. For each 16 tokens: their scores (each
 * token's dot products kept as vectors of partial sums and reduced together), the running max
 * and sum rescaled, then the weighted values added into accumulators held in registers (CHUNKS
 * and GROUP are compile-time constants in the specialised copies below). */
static inline __attribute__((always_inline)) void head_v16(
    const float *qh, const float *k_cache, const float *v_cache, const int32_t *blocks, int64_t len,
    const int64_t GROUP, const int64_t CHUNKS, int64_t block_size, int64_t block_stride, int64_t token_stride,
    int64_t head, float scale, float *out) {
    const int64_t dim = 16 * CHUNKS;
    v16 qv[GROUP][CHUNKS], acc[GROUP][CHUNKS], part[GROUP][16];
    float m[GROUP], l[GROUP];
    for (int64_t g = 0; g < GROUP; g++) {
        for (int64_t c = 0; c < CHUNKS; c++) {
            qv[g][c] = *(const v16u *)(qh + g * dim + 16 * c) * scale;
            acc[g][c] = (v16){0};
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
        const int64_t n = len - s0 < 16 ? len - s0 : 16;
        const float *rows[16];
        for (int64_t t = 0; t < 16; t++) {
            const int slot = BITREV4[t];
            if (t >= n) {
                for (int64_t g = 0; g < GROUP; g++) part[g][slot] = (v16){0};
                continue;
            }
            const int64_t s = s0 + t;
            const int64_t at = (int64_t)blocks[s / block_size] * block_stride + (s % block_size) * token_stride;
            const float *k = k_cache + at + head * dim;
            rows[t] = v_cache + at + head * dim;
            for (int64_t g = 0; g < GROUP; g++) {
                v16 dot = qv[g][0] * *(const v16u *)k;
                for (int64_t c = 1; c < CHUNKS; c++) dot += qv[g][c] * *(const v16u *)(k + 16 * c);
                part[g][slot] = dot;
            }
        }
        const v16i valid = lane < (int32_t)n; /* lane t of the reduced scores holds token t */
        v16 p[GROUP];
        for (int64_t g = 0; g < GROUP; g++) {
            v16 sc = sum_each(part[g]);
            sc = (v16)(((v16i)sc & valid) | ((v16i)((v16){0} - INFINITY) & ~valid));
            const float top = max_lanes(sc);
            const float m_new = top > m[g] ? top : m[g];
            const float corr = m[g] == -INFINITY ? 0.0f : exp_v16((v16){0} + (m[g] - m_new))[0];
            p[g] = exp_v16(sc - m_new);
            l[g] = l[g] * corr + sum_lanes(p[g]);
            m[g] = m_new;
            for (int64_t c = 0; c < CHUNKS; c++) acc[g][c] *= corr;
        }
        for (int64_t t = 0; t < n; t++) {
            const float *v = rows[t];
            for (int64_t g = 0; g < GROUP; g++) {
                const float w = p[g][t];
                for (int64_t c = 0; c < CHUNKS; c++) acc[g][c] += w * *(const v16u *)(v + 16 * c);
            }
        }
    }
    for (int64_t g = 0; g < GROUP; g++) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f; /* len 0: zeros */
        for (int64_t c = 0; c < CHUNKS; c++) *(v16u *)(out + g * dim + 16 * c) = acc[g][c] * inv;
    }
}

#define HEAD_V16(G, C) \
    head_v16(qh, k_cache, v_cache, blocks, len, G, C, block_size, block_stride, token_stride, h, scale, o)

/* The copies with constant sizes for the common shapes (head_dim 64 / 128, GQA groups 1-8), and
 * one with run-time sizes for the rest. Same arithmetic in the same order in each. */
static void head_dispatch(const float *qh, const float *k_cache, const float *v_cache, const int32_t *blocks,
                          int64_t len, int64_t group, int64_t chunks, int64_t block_size, int64_t block_stride,
                          int64_t token_stride, int64_t h, float scale, float *o) {
#define CASE_GROUPS(C)                  \
    switch (group) {                    \
    case 1: HEAD_V16(1, C); return;     \
    case 2: HEAD_V16(2, C); return;     \
    case 4: HEAD_V16(4, C); return;     \
    case 8: HEAD_V16(8, C); return;     \
    default: HEAD_V16(group, C); return; \
    }
    if (chunks == 4) CASE_GROUPS(4)
    if (chunks == 8) CASE_GROUPS(8)
    HEAD_V16(group, chunks);
#undef CASE_GROUPS
}

int tidal_paged_decode_limits(int64_t *max_group, int64_t *max_dim) {
    *max_group = MAX_GROUP;
    *max_dim = MAX_DIM;
    return 0;
}

/* Any other dim: two scalar passes over the context, scores (into `scores`, group * len floats)
 * then softmax and the weighted sum of values. */
static void head_scalar(const float *qh, const float *k_cache, const float *v_cache, const int32_t *blocks,
                        int64_t len, int64_t group, int64_t dim, int64_t block_size, int64_t block_stride,
                        int64_t token_stride, int64_t h, float scale, float *scores, float *o) {
    float acc[MAX_GROUP][MAX_DIM];
    for (int64_t s = 0; s < len; s++) {
        const int64_t at = (int64_t)blocks[s / block_size] * block_stride + (s % block_size) * token_stride;
        const float *k = k_cache + at + h * dim;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qh + g * dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; d++) dot += qg[d] * k[d];
            scores[g * len + s] = dot * scale;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *row = scores + g * len;
        float m = -INFINITY;
        for (int64_t s = 0; s < len; s++) m = row[s] > m ? row[s] : m;
        float sum = 0.0f;
        for (int64_t s = 0; s < len; s++) {
            row[s] = expf(row[s] - m);
            sum += row[s];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f; /* len 0: zeros */
        for (int64_t s = 0; s < len; s++) row[s] *= inv;
        memset(acc[g], 0, sizeof(float) * (size_t)dim);
    }
    for (int64_t s = 0; s < len; s++) {
        const int64_t at = (int64_t)blocks[s / block_size] * block_stride + (s % block_size) * token_stride;
        const float *v = v_cache + at + h * dim;
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * len + s];
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) acc[g][d] += p * v[d];
        }
    }
    for (int64_t g = 0; g < group; g++) memcpy(o + g * dim, acc[g], sizeof(float) * (size_t)dim);
}

int tidal_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                           const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
                           float *out, int64_t row_begin, int64_t row_end, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t dim, int64_t block_size, float scale) {
    const int64_t group = num_q_heads / num_kv_heads;
    if (group > MAX_GROUP || dim > MAX_DIM || group * num_kv_heads != num_q_heads) return 1;
    const int64_t token_stride = num_kv_heads * dim; /* between two slots of a block */
    const int64_t block_stride = block_size * token_stride;
    float *scores = NULL;
    if (dim % 16) {
        int64_t max_len = 1;
        for (int64_t b = row_begin; b < row_end; b++)
            if (seq_lens[b] > max_len) max_len = seq_lens[b];
        scores = malloc(sizeof(float) * (size_t)(group * max_len));
        if (scores == NULL) return 2;
    }
    for (int64_t b = row_begin; b < row_end; b++) {
        const int32_t *blocks = block_tables + b * bt_stride;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const float *qh = q + (b * num_q_heads + h * group) * dim; /* [group, dim] */
            float *o = out + (b * num_q_heads + h * group) * dim;
            if (scores == NULL)
                head_dispatch(qh, k_cache, v_cache, blocks, seq_lens[b], group, dim / 16, block_size, block_stride,
                              token_stride, h, scale, o);
            else
                head_scalar(qh, k_cache, v_cache, blocks, seq_lens[b], group, dim, block_size, block_stride,
                            token_stride, h, scale, scores, o);
        }
    }
    free(scores);
    return 0;
}

/* -- row kernels ------------------------------------------------------------------------------ */

/* out [T, heads, dim] = the first `heads` heads of x [T, >= heads * dim] (row stride x_stride),
 * rotated (neox halves) by the cos | sin row of `table` [max_pos, dim] at positions[t]. */
int tidal_rope_f32(const float *x, int64_t x_stride, const int64_t *positions, const float *table, float *out,
                   int64_t tokens, int64_t heads, int64_t dim) {
    if (dim % 2) return 1;
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *cos = table + positions[t] * dim, *sin = cos + half;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + h * dim;
            float *o = out + (t * heads + h) * dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = xh[i], x2 = xh[i + half];
                o[i] = x1 * cos[i] - x2 * sin[i];
                o[i + half] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
    return 0;
}

/* out [rows, inter] = SiLU(gate) * up for gate_up [rows, 2 * inter] (row stride gu_stride). */
int tidal_silu_mul_f32(const float *gate_up, int64_t gu_stride, float *out, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * gu_stride, *u = g + inter;
        float *o = out + r * inter;
        int64_t i = 0;
        for (; i + 16 <= inter; i += 16) {
            const v16 gv = *(const v16u *)(g + i);
            *(v16u *)(o + i) = gv / (1.0f + exp_v16((v16){0} - gv)) * *(const v16u *)(u + i);
        }
        for (; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    return 0;
}
