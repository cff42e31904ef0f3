/* The per-token layer ops of a LLaMA decoder step, in C, for the CPU: RMSNorm (with the
 * residual add fused in), rotary position embedding, the SwiGLU MLP's silu(gate) * up,
 * and the greedy sampler's row reductions: argmax and log-sum-exp of each row of
 * logits in one call, and the second half of the bf16 greedy screen (below).
 *
 * Not the paper's subject: they are here because at decode batch sizes each is a few
 * tens of thousands of floats, and torch runs each as several multi-threaded passes
 * whose dispatch costs more than the arithmetic. One pass over data already in cache,
 * rows split over torch's OpenMP threads, is several times cheaper. vLLM's CPU build
 * has the same ops for the same reason.
 *
 * Invariant: the arithmetic is transformers' own, operation for operation: the rotary
 * products are each rounded before they are added (built with -ffp-contract=off, so no
 * fused multiply-add changes a rounding), which makes the rotation bit-identical to
 * the torch path; RMSNorm sums the squares in another order than torch, and the
 * exponentials below are this file's own, so those agree to float32 rounding, not bit
 * for bit. Infinities and NaNs keep their IEEE meaning here (no -ffast-math).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 16 floats: one AVX-512 register (two AVX2 ones elsewhere), for the long rows of
 * logits; GCC's vector extension, so the compiler picks the machine's instructions. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
static inline v16 load16(const float *p) { v16 r; memcpy(&r, p, sizeof r); return r; }
static inline v16 splat16(float a) { return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
static inline v16 select16(v16i mask, v16 a, v16 b) { return (v16)((mask & (v16i)a) | (~mask & (v16i)b)); }

/* exp of 16 floats (Cephes' expf: exp(x) = 2^n exp(r), |r| <= ln2 / 2, a degree-7
 * polynomial for exp(r)); about 1 ulp from the exact value. Above ln(FLT_MAX) it is
 * +inf; below -87.3 it stays at ~1e-38 rather than reaching 0 (so exp16(-inf) ~ 1e-38:
 * callers that sum it add at most n * 1e-38). */
static inline v16 exp16(v16 in) {
    v16 x = select16(in < splat16(-87.3f), splat16(-87.3f), in);
    x = select16(x > splat16(88.0f), splat16(88.0f), x);
    const v16 magic = splat16(12582912.0f);         /* 1.5 * 2^23: rounds to an integer */
    const v16 n = (x * splat16(1.44269504088896341f) + magic) - magic;
    const v16 r = (x - n * splat16(0.693359375f)) + n * splat16(2.12194440e-4f);
    v16 p = splat16(1.9875691500e-4f);
    p = p * r + splat16(1.3981999507e-3f);
    p = p * r + splat16(8.3334519073e-3f);
    p = p * r + splat16(4.1665795894e-2f);
    p = p * r + splat16(1.6666665459e-1f);
    p = p * r + splat16(5.0000001201e-1f);
    p = p * (r * r) + r + splat16(1.0f);
    const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23; /* 2^n */
    return select16(in > splat16(88.7228f), splat16(INFINITY), p * (v16)bits);
}

/* If residual is not NULL: residual += x (the skip connection), then the norm is taken
 * of the sum. out[r] = weight * v / sqrt(mean(v^2) + eps), v = that row. Rows of x, out
 * and residual are contiguous, `stride` floats apart; out may be x. */
void rms_norm_f32(float *out, const float *x, float *residual, const float *weight,
                  int64_t rows, int64_t n, int64_t stride, float eps) {
#pragma omp parallel for schedule(static)
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
#pragma omp parallel for schedule(static)
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

/* out [rows, n] = silu(gate) * up = gate / (1 + exp(-gate)) * up (torch's silu, with
 * this file's exponential), where row r of the gate+up product holds gate in its first
 * n floats and up in the next n, rows `stride` floats apart. One pass, writing a dense
 * output for the down projection (torch's in-place silu and multiply took two passes
 * and left a strided view). */
void silu_mul_f32(float *out, const float *gate_up, int64_t rows, int64_t n, int64_t stride) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gate_up + r * stride, *u = g + n;
        float *o = out + r * n;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const v16 x = load16(g + i);
            const v16 y = x / (splat16(1.0f) + exp16(-x)) * load16(u + i);
            memcpy(o + i, &y, sizeof y);
        }
        for (; i < n; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* For each row of x [rows, n] (rows `stride` floats apart): the index of its first
 * largest value and log(sum(exp(x))), what greedy sampling and the chosen token's
 * logprob need, reading the row twice (a 49152-token row of logits is 192 KB: the
 * second read is from the core's L2). Returns 1 if a row holds a NaN (nothing is then
 * promised about that row: the caller uses its portable path), else 0. Two
 * accumulators of 16 lanes each, so the loops are not bound by one chain of
 * dependent compares or adds. */
int argmax_logsumexp_f32(const float *x, int64_t rows, int64_t n, int64_t stride,
                         int64_t *argmax, float *lse) {
    int saw_nan = 0;
#pragma omp parallel for schedule(static) reduction(| : saw_nan)
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * stride;
        /* 1. the largest value and where it first is, and whether any is NaN: each
         * lane keeps its largest value and the first index holding it */
        v16 m0 = splat16(-INFINITY), m1 = m0;
        v16i at0 = {0}, at1 = {0}, nan = {0};
        const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            const v16 a = load16(row + i), b = load16(row + i + 16);
            nan |= (a != a) | (b != b);
            const v16i ga = a > m0, gb = b > m1;      /* strictly larger: first wins */
            m0 = select16(ga, a, m0);
            m1 = select16(gb, b, m1);
            at0 = (ga & (lane + (int32_t)i)) | (~ga & at0);
            at1 = (gb & (lane + (int32_t)(i + 16))) | (~gb & at1);
        }
        float mx = -INFINITY;
        int64_t best = n;
        for (int k = 0; k < 16; ++k) {
            saw_nan |= nan[k] != 0;
            const float c[2] = {m0[k], m1[k]};
            const int64_t w[2] = {at0[k], at1[k]};
            for (int h = 0; h < 2; ++h)
                if (i > 0 && (c[h] > mx || (c[h] == mx && w[h] < best))) { mx = c[h]; best = w[h]; }
        }
        for (; i < n; ++i) {
            saw_nan |= row[i] != row[i];
            if (row[i] > mx || best == n) { mx = row[i]; best = i; }
        }
        argmax[r] = best < n ? best : 0;
        if (mx == -INFINITY || mx == INFINITY) { /* all -inf: -inf; any +inf: +inf */
            if (mx == -INFINITY) argmax[r] = 0;
            lse[r] = mx;
            continue;
        }
        /* 2. log(sum(exp(x - max))) + max */
        v16 acc0 = splat16(0.0f), acc1 = acc0;
        for (i = 0; i + 32 <= n; i += 32) {
            acc0 += exp16(load16(row + i) - splat16(mx));
            acc1 += exp16(load16(row + i + 16) - splat16(mx));
        }
        float total = 0.0f;
        for (; i < n; ++i) total += expf(row[i] - mx);
        for (int k = 0; k < 16; ++k) total += acc0[k] + acc1[k];
        lse[r] = mx + logf(total);
    }
    return saw_nan;
}


/* 16 bf16 values (the top halves of float32s) as 16 floats: exact. */
typedef uint16_t v16h __attribute__((vector_size(32)));
static inline v16 load16_bf16(const uint16_t *p) {
    v16h b; memcpy(&b, p, sizeof b);
    return (v16)(__builtin_convertvector(b, v16i) << 16);
}

/* float32 dot product of two k-vectors in a fixed order (16 lane sums, then the lanes
 * in order): the "float32 logit" that the screen's result is the argmax of. */
static float dot_f32(const float *a, const float *b, int64_t k) {
    v16 acc = splat16(0.0f);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) acc += load16(a + i) * load16(b + i);
    float total = 0.0f;
    for (int j = 0; j < 16; ++j) total += acc[j];
    for (; i < k; ++i) total += a[i] * b[i];
    return total;
}

/* The greedy screen (models/greedy_head.py): per row r, lb[r] holds the bf16 logits
 * of the bf16-rounded hidden state hb[r] against the bf16-rounded LM head. Every
 * logit's distance from the float32 one is bounded by
 *     E[v] = alpha * wn[v] + beta * dwn[v] + c * |lb[v]|
 * (wn[v] = |w_v|, dwn[v] = |w_v - bf16(w_v)|; alpha, beta from the row's norms, see
 * greedy_head.py). A token whose bf16 logit plus its bound is below the best lower
 * bound cannot be the float32 argmax; the others (usually 1 or 2) are rescored in
 * float32 from h and w, in index order, the first largest winning. tokens[r]: the
 * argmax, candidates[r]: how many were rescored (-1 if the row holds a NaN or an
 * infinity: the caller must take its float32 path). Returns the number of such rows. */
int greedy_screen_f32(const uint16_t *lb, int64_t lb_stride, const uint16_t *hb,
                      const float *h, int64_t rows, int64_t k, const float *w,
                      const float *wn, const float *dwn, int64_t vocab,
                      int64_t *tokens, int64_t *candidates) {
    int failed = 0;
    /* gamma: the float32 summation bound of k products; 2^-8 / (1 - 2^-8): a bf16
     * rounding of the result; SAFETY: this function's own float32 roundings of E */
    const double gamma = (double)(k + 2) * 0x1p-24 / (1.0 - (double)(k + 2) * 0x1p-24);
    const double SAFETY = 1.0 + 0x1p-10;
#pragma omp parallel for schedule(static) reduction(+ : failed)
    for (int64_t r = 0; r < rows; ++r) {
        const float *hr = h + r * k;
        const uint16_t *row = lb + r * lb_stride;
        double dh2 = 0.0, hb2 = 0.0, h2 = 0.0;
        for (int64_t i = 0; i < k; ++i) {
            uint32_t bits = (uint32_t)hb[r * k + i] << 16;
            float b;
            memcpy(&b, &bits, sizeof b);
            const double d = (double)hr[i] - (double)b;
            dh2 += d * d; hb2 += (double)b * b; h2 += (double)hr[i] * hr[i];
        }
        if (!isfinite(h2) || !isfinite(hb2)) {
            candidates[r] = -1; tokens[r] = 0; ++failed; continue;
        }
        const float alpha = (float)((sqrt(dh2) + gamma * (sqrt(hb2) + sqrt(h2))) * SAFETY);
        const float beta = (float)(sqrt(hb2) * (1.0 + gamma) * SAFETY);
        const float c = (float)(0x1p-8 / (1.0 - 0x1p-8) * SAFETY);
        /* 1. the largest lower bound lb - E over the row (and whether any value is not
         * finite: an infinity or NaN times anything keeps the bound from holding) */
        v16 lo = splat16(-INFINITY);
        v16i bad = {0};
        int64_t v = 0;
        for (; v + 16 <= vocab; v += 16) {
            const v16 x = load16_bf16(row + v);
            const v16 ax = select16(x < splat16(0.0f), -x, x);
            bad |= (x != x) | (ax == splat16(INFINITY));
            const v16 e = splat16(alpha) * load16(wn + v) + splat16(beta) * load16(dwn + v)
                          + splat16(c) * ax;
            const v16 l = x - e;
            lo = select16(l > lo, l, lo);
        }
        float lower = -INFINITY;
        int any_bad = 0;
        for (int j = 0; j < 16; ++j) {
            lower = lo[j] > lower ? lo[j] : lower;
            any_bad |= bad[j] != 0;
        }
        for (int64_t t = v; t < vocab; ++t) {
            uint32_t bits = (uint32_t)row[t] << 16;
            float x;
            memcpy(&x, &bits, sizeof x);
            if (!isfinite(x)) any_bad = 1;
            const float l = x - (alpha * wn[t] + beta * dwn[t] + c * fabsf(x));
            lower = l > lower ? l : lower;
        }
        if (any_bad || !isfinite(lower)) { candidates[r] = -1; tokens[r] = 0; ++failed; continue; }
        /* 2. rescore, in index order, each token whose upper bound lb + E reaches it
         * (less a slack for the float32 roundings of lb + E and of lower itself) */
        const float threshold = lower - 0x1p-18f * (fabsf(lower) + 1.0f);
        float best = -INFINITY;
        int64_t best_token = -1, count = 0;
        for (int64_t t = 0; t < vocab; t += 16) {
            const int64_t end = t + 16 <= vocab ? t + 16 : vocab;
            if (end - t == 16) {
                const v16 x = load16_bf16(row + t);
                const v16 ax = select16(x < splat16(0.0f), -x, x);
                const v16 up = x + (splat16(alpha) * load16(wn + t)
                                    + splat16(beta) * load16(dwn + t) + splat16(c) * ax);
                const v16i hit = up >= splat16(threshold);
                int64_t any = 0;
                for (int j = 0; j < 16; ++j) any |= hit[j];
                if (!any) continue;
            }
            for (int64_t u = t; u < end; ++u) {
                uint32_t bits = (uint32_t)row[u] << 16;
                float x;
                memcpy(&x, &bits, sizeof x);
                if (x + (alpha * wn[u] + beta * dwn[u] + c * fabsf(x)) < threshold) continue;
                const float exact = dot_f32(hr, w + u * k, k);
                ++count;
                if (best_token < 0 || exact > best) { best = exact; best_token = u; }
            }
        }
        tokens[r] = best_token;
        candidates[r] = count;
    }
    return failed;
}
