/* Paged decode attention on the CPU, float32: one query token per sequence, read straight from
 * the block table (no gathered copy of the context). Built and loaded by tidal/kernels/cpu_native.py.
 *
 * Layouts (all contiguous):
 *   q, out        [B, Hq, D]
 *   k_cache       [num_blocks, block_size, Hkv, D]   (one layer's keys; v_cache the same)
 *   block_tables  [B, bt_stride] int32, seq_lens [B] int32
 * Rows [row_begin, row_end) are computed, so a caller can split a batch across threads.
 *
 * For each sequence and KV head, the Hq / Hkv query heads that share it are done together: each
 * key and value row is read once for the whole group. Two passes over the context: scores
 * (into a per-call buffer), then softmax and the weighted sum of values. Each row's result
 * depends only on that row's inputs, in a fixed order.
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

/* Pass 1 when dim is a multiple of 16: scores[g][s] = scale * q_g . k_s, 16 tokens at a time,
 * each token's dot products kept as vectors of partial sums and reduced together. */
static void scores_v16(const float *qh, const float *k_cache, const int32_t *blocks, int64_t len, int64_t group,
                       int64_t dim, int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head,
                       float scale, float *scores) {
    const int64_t chunks = dim / 16;
    v16 qv[MAX_GROUP][MAX_DIM / 16];
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < chunks; c++) qv[g][c] = *(const v16u *)(qh + g * dim + 16 * c) * scale;
    v16 part[MAX_GROUP][16];
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
        const int64_t n = len - s0 < 16 ? len - s0 : 16;
        for (int64_t t = 0; t < 16; t++) {
            const int slot = BITREV4[t];
            if (t >= n) {
                for (int64_t g = 0; g < group; g++) part[g][slot] = (v16){0};
                continue;
            }
            const int64_t s = s0 + t;
            const float *k = k_cache + (int64_t)blocks[s / block_size] * block_stride +
                             (s % block_size) * token_stride + head * dim;
            for (int64_t g = 0; g < group; g++) {
                v16 acc = qv[g][0] * *(const v16u *)k;
                for (int64_t c = 1; c < chunks; c++) acc += qv[g][c] * *(const v16u *)(k + 16 * c);
                part[g][slot] = acc;
            }
        }
        for (int64_t g = 0; g < group; g++) {
            const v16 sums = sum_each(part[g]);
            memcpy(scores + g * len + s0, &sums, sizeof(float) * (size_t)n);
        }
    }
}

int tidal_paged_decode_limits(int64_t *max_group, int64_t *max_dim) {
    *max_group = MAX_GROUP;
    *max_dim = MAX_DIM;
    return 0;
}

int tidal_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                           const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
                           float *out, int64_t row_begin, int64_t row_end, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t dim, int64_t block_size, float scale) {
    const int64_t group = num_q_heads / num_kv_heads;
    if (group > MAX_GROUP || dim > MAX_DIM || group * num_kv_heads != num_q_heads) return 1;
    const int64_t token_stride = num_kv_heads * dim;      /* between two slots of a block */
    const int64_t block_stride = block_size * token_stride;
    int64_t max_len = 0;
    for (int64_t b = row_begin; b < row_end; b++)
        if (seq_lens[b] > max_len) max_len = seq_lens[b];
    float *scores = malloc(sizeof(float) * (size_t)(group * (max_len > 0 ? max_len : 1)));
    if (scores == NULL) return 2;
    float acc[MAX_GROUP][MAX_DIM];

    for (int64_t b = row_begin; b < row_end; b++) {
        const int64_t len = seq_lens[b];
        const int32_t *blocks = block_tables + b * bt_stride;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const float *qh = q + (b * num_q_heads + h * group) * dim; /* [group, dim] */
            /* pass 1: scores[g][s] = scale * q_g . k_s */
            if (dim % 16 == 0) {
                scores_v16(qh, k_cache, blocks, len, group, dim, block_size, block_stride, token_stride, h, scale,
                           scores);
            } else {
                for (int64_t s0 = 0; s0 < len; s0 += block_size) {
                const float *kb = k_cache + (int64_t)blocks[s0 / block_size] * block_stride + h * dim;
                const int64_t n = len - s0 < block_size ? len - s0 : block_size;
                for (int64_t t = 0; t < n; t++) {
                    const float *k = kb + t * token_stride;
                    for (int64_t g = 0; g < group; g++) {
                        const float *qg = qh + g * dim;
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t d = 0; d < dim; d++) dot += qg[d] * k[d];
                        scores[g * len + s0 + t] = dot * scale;
                    }
                }
            }
            }
            /* softmax over each query head's row of scores */
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
            /* pass 2: out_g = sum_s p[g][s] v_s */
            for (int64_t s0 = 0; s0 < len; s0 += block_size) {
                const float *vb = v_cache + (int64_t)blocks[s0 / block_size] * block_stride + h * dim;
                const int64_t n = len - s0 < block_size ? len - s0 : block_size;
                for (int64_t t = 0; t < n; t++) {
                    const float *v = vb + t * token_stride;
                    for (int64_t g = 0; g < group; g++) {
                        const float p = scores[g * len + s0 + t];
                        float *a = acc[g];
#pragma omp simd
                        for (int64_t d = 0; d < dim; d++) a[d] += p * v[d];
                    }
                }
            }
            for (int64_t g = 0; g < group; g++)
                memcpy(out + (b * num_q_heads + h * group + g) * dim, acc[g], sizeof(float) * (size_t)dim);
        }
    }
    free(scores);
    return 0;
}
