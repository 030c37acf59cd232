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
#include <omp.h>
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

/* Offset (in floats) of position t's slot, through the sequence's block table. */
static inline int64_t slot_offset(const int32_t *table, int64_t t, int64_t block_size, int64_t slot_size) {
    return ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_size;
}

/* row[0..n) <- exp(row - max(row)), the softmax numerator; returns its sum, and the max in *max_out. */
static float exp_row(float *row, int64_t n, float *max_out) {
    float max = -FLT_MAX, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) max = row[t] > max ? row[t] : max;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        row[t] = expf(row[t] - max);
        sum += row[t];
    }
    *max_out = max;
    return sum;
}

/* Scores, softmax numerator and value sums of one sequence over keys [begin, end):
 * max_out/sum_out [H] and acc [H, D] (unnormalised), merged by the caller. */
static void decode_part(const float *query, const float *k_cache, const float *v_cache, const int32_t *table,
                        int64_t begin, int64_t end, int64_t num_heads, int64_t group, int64_t head_dim,
                        int64_t slot_size, int64_t block_size, float scale, float *max_out, float *sum_out,
                        float *acc) {
    const int64_t len = end - begin;
    for (int64_t i = 0; i < num_heads * head_dim; i++) acc[i] = 0.0f;
    for (int64_t h = 0; h < num_heads; h++) max_out[h] = -FLT_MAX, sum_out[h] = 0.0f;
    if (len <= 0) return;
    float *scores = malloc(sizeof(float) * num_heads * len); /* [H, len] */
    for (int64_t t = begin; t < end; t++) {
        const float *key = k_cache + slot_offset(table, t, block_size, slot_size);
        for (int64_t h = 0; h < num_heads; h++)
            scores[h * len + t - begin] = dot(query + h * head_dim, key + (h / group) * head_dim, head_dim) * scale;
    }
    for (int64_t h = 0; h < num_heads; h++) sum_out[h] = exp_row(scores + h * len, len, max_out + h);
    for (int64_t t = begin; t < end; t++) {
        const float *value = v_cache + slot_offset(table, t, block_size, slot_size);
        for (int64_t h = 0; h < num_heads; h++)
            axpy(acc + h * head_dim, scores[h * len + t - begin], value + (h / group) * head_dim, head_dim);
    }
    free(scores);
}

/* q: [B, H, D] with row stride q_stride (floats between sequences); out: [B, H, D] contiguous.
 * k_cache, v_cache: [N, S, Hkv, D] contiguous. block_tables: [B, table_stride] int32.
 * A task is one sequence, walking its blocks in memory order (all KV heads of a slot are
 * adjacent), which streams from DRAM far better than one head at a time. With fewer
 * sequences than threads, each context is split into parts whose softmaxes are merged. */
void paged_decode_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens,
                                float *out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads, width = num_heads * head_dim;
    const int64_t threads = omp_get_max_threads();
    const int64_t parts = num_seqs >= 2 * threads ? 1 : (2 * threads + num_seqs - 1) / num_seqs;
    float *maxes = malloc(sizeof(float) * num_seqs * parts * num_heads); /* [B, P, H] */
    float *sums = malloc(sizeof(float) * num_seqs * parts * num_heads);
    float *accs = malloc(sizeof(float) * num_seqs * parts * width);      /* [B, P, H, D] */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_seqs * parts; task++) {
        const int64_t b = task / parts, part = task % parts, ctx = context_lens[b];
        const int64_t part_len = (ctx + parts - 1) / parts;
        const int64_t begin = part * part_len, end = begin + part_len < ctx ? begin + part_len : ctx;
        decode_part(q + b * q_stride, k_cache, v_cache, block_tables + b * table_stride, begin, end, num_heads, group,
                    head_dim, num_kv_heads * head_dim, block_size, scale, maxes + task * num_heads,
                    sums + task * num_heads, accs + task * width);
    }
    for (int64_t b = 0; b < num_seqs; b++) {
        for (int64_t h = 0; h < num_heads; h++) {
            float max = -FLT_MAX, total = 0.0f;
            for (int64_t p = 0; p < parts; p++) max = fmaxf(max, maxes[(b * parts + p) * num_heads + h]);
            float *o = out + b * width + h * head_dim;
            for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
            for (int64_t p = 0; p < parts; p++) {
                const int64_t idx = (b * parts + p) * num_heads + h;
                if (sums[idx] == 0.0f) continue; /* an empty part */
                const float w = expf(maxes[idx] - max);
                total += w * sums[idx];
                axpy(o, w, accs + (b * parts + p) * width + h * head_dim, head_dim);
            }
            const float inv = 1.0f / total;
            for (int64_t d = 0; d < head_dim; d++) o[d] *= inv;
        }
    }
    free(maxes), free(sums), free(accs);
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
            const float *key = k_cache + slot_offset(table, t, block_size, slot_size) + kvh * head_dim;
            for (int64_t i = 0; i < count; i++) {
                const float *qi = q + (query_start_loc[b] + first + i) * q_stride + kvh * group * head_dim;
                for (int64_t g = 0; g < group; g++)  /* masked (future) keys are scored, then skipped */
                    scores[(i * group + g) * keys + t] = dot(qi + g * head_dim, key, head_dim) * scale;
            }
        }
        for (int64_t i = 0; i < count; i++) {
            const int64_t visible = base_pos + i + 1;
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + (i * group + g) * keys, max;
                const float inv = 1.0f / exp_row(row, visible, &max);
                for (int64_t t = 0; t < visible; t++) row[t] *= inv;
                float *o = out + (query_start_loc[b] + first + i) * num_heads * head_dim + (kvh * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
            }
        }
        for (int64_t t = 0; t < keys; t++) {
            const float *value = v_cache + slot_offset(table, t, block_size, slot_size) + kvh * head_dim;
            for (int64_t i = (t > base_pos ? t - base_pos : 0); i < count; i++)  /* queries that see key t */
                for (int64_t g = 0; g < group; g++)
                    axpy(out + (query_start_loc[b] + first + i) * num_heads * head_dim + (kvh * group + g) * head_dim,
                         scores[(i * group + g) * keys + t], value, head_dim);
        }
        free(scores);
    }
    free(tile_start);
}
