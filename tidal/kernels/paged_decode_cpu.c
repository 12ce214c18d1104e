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
