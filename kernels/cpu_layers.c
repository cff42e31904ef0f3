/* The per-token layer ops of a LLaMA decoder step, in C, for the CPU: RMSNorm (with the
 * residual add fused in) and rotary position embedding.
 *
 * Not the paper's subject: they are here because at decode batch sizes each is a few
 * tens of thousands of floats, and torch runs each as several multi-threaded passes
 * whose thread wake-ups cost more than the arithmetic. One single-threaded pass over
 * data already in cache is ~10x cheaper. vLLM's CPU build has the same ops for the
 * same reason.
 *
 * Invariant: the arithmetic is transformers' own, operation for operation: the rotary
 * products are each rounded before they are added (built with -ffp-contract=off, so no
 * fused multiply-add changes a rounding), which makes the rotation bit-identical to
 * the torch path; RMSNorm sums the squares in another order than torch, so it agrees
 * to float32 rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>

/* If residual is not NULL: residual += x (the skip connection), then the norm is taken
 * of the sum. out[r] = weight * v / sqrt(mean(v^2) + eps), v = that row. Rows of x, out
 * and residual are contiguous, `stride` floats apart; out may be x. */
void rms_norm_f32(float *out, const float *x, float *residual, const float *weight,
                  int64_t rows, int64_t n, int64_t stride, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * stride;
        float *v = (float *)xr;
        if (residual) {
            float *res = residual + r * stride;
            for (int64_t i = 0; i < n; ++i) res[i] += xr[i];
            v = res;
        }
        float sumsq = 0.0f;
#pragma omp simd reduction(+ : sumsq)
        for (int64_t i = 0; i < n; ++i) sumsq += v[i] * v[i];
        const float inv = 1.0f / sqrtf(sumsq / (float)n + eps);
        float *o = out + r * stride;
        for (int64_t i = 0; i < n; ++i) o[i] = weight[i] * (v[i] * inv);
    }
}

/* Rotate x [tokens, heads, head_dim] in place; token t's rows start token_stride
 * floats apart (x may be a view into the fused QKV output). cos/sin [tokens, head_dim/2]
 * are the rows of the token's position. rotate_half pairing: i with i + head_dim/2. */
void rotary_f32(float *x, int64_t tokens, int64_t token_stride, int64_t heads,
                int64_t head_dim, const float *cos, const float *sin) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < heads; ++h) {
            float *x1 = x + t * token_stride + h * head_dim, *x2 = x1 + half;
            for (int64_t i = 0; i < half; ++i) {
                const float a = x1[i] * c[i] - x2[i] * s[i];
                const float b = x2[i] * c[i] + x1[i] * s[i];
                x1[i] = a;
                x2[i] = b;
            }
        }
    }
}
