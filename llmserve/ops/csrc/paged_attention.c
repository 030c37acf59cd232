/* Paged attention on CPU, float32, GQA: decode (one query token per sequence) and
 * causal prefill chunks (ragged queries at the end of each sequence's context).
 *
 * Legend: B sequences, H query heads, Hkv KV heads, G = H / Hkv, D head dim,
 * N cache blocks, S block size, C context length of a sequence.
 *
 * Tasks read keys and values straight out of the cache blocks -- no gathered copy --
 * score every query head against every key, softmax, and sum the values. Tasks run
 * in parallel with OpenMP (the same libgomp that torch has
 * already loaded). Built on first use by cpu_kernels.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

static void axpy(float *y, float a, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* q: [B, H, D] with row stride q_stride (floats between sequences); out: [B, H, D] contiguous.
 * k_cache, v_cache: [N, S, Hkv, D] contiguous. block_tables: [B, table_stride] int32.
 * One task per sequence walks its blocks in memory order (all KV heads of a slot are
 * adjacent), which streams from DRAM far better than one head at a time. */
void paged_decode_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens,
                                float *out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_size = num_kv_heads * head_dim; /* floats per cached token */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t ctx = context_lens[b];
        const int32_t *table = block_tables + b * table_stride;
        const float *query = q + b * q_stride;  /* [H, D] */
        float *o = out + b * num_heads * head_dim; /* [H, D] */
        float *scores = malloc(sizeof(float) * num_heads * ctx); /* [H, C] */
        /* scores[h, t] = q[h] . k[t, h / G] * scale */
        for (int64_t t = 0; t < ctx; t++) {
            const float *key = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_size;
            for (int64_t h = 0; h < num_heads; h++)
                scores[h * ctx + t] = dot(query + h * head_dim, key + (h / group) * head_dim, head_dim) * scale;
        }
        /* softmax over each head's row */
        for (int64_t h = 0; h < num_heads; h++) {
            float *row = scores + h * ctx;
            float max = -FLT_MAX, sum = 0.0f;
            for (int64_t t = 0; t < ctx; t++) max = row[t] > max ? row[t] : max;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < ctx; t++) {
                row[t] = expf(row[t] - max);
                sum += row[t];
            }
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < ctx; t++) row[t] *= inv;
        }
        /* o[h] = sum_t scores[h, t] * v[t, h / G], one pass over the values */
        for (int64_t i = 0; i < num_heads * head_dim; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < ctx; t++) {
            const float *value = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_size;
            for (int64_t h = 0; h < num_heads; h++)
                axpy(o + h * head_dim, scores[h * ctx + t], value + (h / group) * head_dim, head_dim);
        }
        free(scores);
    }
}

/* Causal attention of prefill chunks over paged KV: sequence b has q_len = qsl[b+1] - qsl[b]
 * query tokens, the last q_len of its ctx = context_lens[b] positions. q: [Tp, H, D] with
 * row stride q_stride; out: [Tp, H, D] contiguous. A task is (sequence, KV head, tile of
 * QUERY_TILE queries): each key row is loaded once for the tile's QUERY_TILE * G query heads. */
#define QUERY_TILE 16
void paged_prefill_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                                 const int32_t *block_tables, int64_t table_stride, const int32_t *query_start_loc,
                                 const int32_t *context_lens, float *out, int64_t num_seqs, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_size = num_kv_heads * head_dim;
    /* task t covers tiles [tile_start[b], tile_start[b + 1]) of sequence b, times KV heads */
    int64_t *tile_start = malloc(sizeof(int64_t) * (num_seqs + 1));
    tile_start[0] = 0;
    for (int64_t b = 0; b < num_seqs; b++)
        tile_start[b + 1] = tile_start[b] + (query_start_loc[b + 1] - query_start_loc[b] + QUERY_TILE - 1) / QUERY_TILE;
    const int64_t num_tasks = tile_start[num_seqs] * num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; task++) {
        const int64_t kvh = task % num_kv_heads, tile = task / num_kv_heads;
        int64_t b = 0;
        while (tile_start[b + 1] <= tile) b++;
        const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b], ctx = context_lens[b];
        const int64_t first = (tile - tile_start[b]) * QUERY_TILE;           /* first query of the tile */
        const int64_t count = q_len - first < QUERY_TILE ? q_len - first : QUERY_TILE;
        const int64_t base_pos = ctx - q_len + first;                        /* its position */
        const int64_t keys = base_pos + count;                               /* keys the tile can see */
        const int32_t *table = block_tables + b * table_stride;
        const int64_t rows = count * group;                                  /* (query, head) pairs */
        float *scores = malloc(sizeof(float) * rows * keys);                 /* [count * G, keys] */
        for (int64_t t = 0; t < keys; t++) {
            const float *key = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_size
                               + kvh * head_dim;
            for (int64_t i = 0; i < count; i++) {
                const float *qi = q + (query_start_loc[b] + first + i) * q_stride + kvh * group * head_dim;
                for (int64_t g = 0; g < group; g++)  /* masked (future) keys are scored, then skipped */
                    scores[(i * group + g) * keys + t] = dot(qi + g * head_dim, key, head_dim) * scale;
            }
        }
        for (int64_t i = 0; i < count; i++) {
            const int64_t visible = base_pos + i + 1;
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + (i * group + g) * keys;
                float max = -FLT_MAX, sum = 0.0f;
                for (int64_t t = 0; t < visible; t++) max = row[t] > max ? row[t] : max;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < visible; t++) {
                    row[t] = expf(row[t] - max);
                    sum += row[t];
                }
                const float inv = 1.0f / sum;
                for (int64_t t = 0; t < visible; t++) row[t] *= inv;
                float *o = out + (query_start_loc[b] + first + i) * num_heads * head_dim + (kvh * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
            }
        }
        for (int64_t t = 0; t < keys; t++) {
            const float *value = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_size
                                 + kvh * head_dim;
            for (int64_t i = (t > base_pos ? t - base_pos : 0); i < count; i++)  /* queries that see key t */
                for (int64_t g = 0; g < group; g++)
                    axpy(out + (query_start_loc[b] + first + i) * num_heads * head_dim + (kvh * group + g) * head_dim,
                         scores[(i * group + g) * keys + t], value, head_dim);
        }
        free(scores);
    }
    free(tile_start);
}
