/* Fused elementwise ops for the CPU decoder layer, float32: each call replaces 3-20 torch
 * ops (and as many passes over memory) with one. Built on first use by cpu_kernels.py.
 *
 * Legend: T tokens, E hidden size, H heads, D head dim, I intermediate size.
 */
#include <math.h>
#include <stdint.h>

/* Rows are split over threads only when there is enough work to pay for waking them. */
#define PARALLEL_MIN_ELEMENTS 65536

/* residual [T, E] += delta (when delta is not NULL); out [T, E] = rmsnorm(residual) * weight. */
void add_rms_norm_f32(float *residual, const float *delta, const float *weight, float *out,
                      int64_t num_tokens, int64_t hidden, float eps) {
#pragma omp parallel for if (num_tokens * hidden >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < num_tokens; t++) {
        float *x = residual + t * hidden;
        if (delta != 0) {
            const float *d = delta + t * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; i++) x[i] += d[i];
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) sum += x[i] * x[i];
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        float *y = out + t * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) y[i] = weight[i] * (x[i] * inv);
    }
}

/* Rotate x [T, H, D] in place (GPT-NeoX halves); rows of x are row_stride floats apart and
 * the H heads of a row adjacent. cos/sin: [P, D/2] tables indexed by positions [T]. */
void rope_f32(float *x, int64_t row_stride, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
              const int64_t *positions, const float *cos_table, const float *sin_table) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for if (num_tokens * num_heads * head_dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *cos = cos_table + positions[t] * half;
        const float *sin = sin_table + positions[t] * half;
        for (int64_t h = 0; h < num_heads; h++) {
            float *x1 = x + t * row_stride + h * head_dim, *x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/* gate_up [T, 2I] (gate then up) -> out [T, I] = silu(gate) * up. */
void silu_and_mul_f32(const float *gate_up, float *out, int64_t num_tokens, int64_t size) {
#pragma omp parallel for if (num_tokens * size >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *gate = gate_up + t * 2 * size, *up = gate + size;
        float *y = out + t * size;
#pragma omp simd
        for (int64_t i = 0; i < size; i++) y[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
