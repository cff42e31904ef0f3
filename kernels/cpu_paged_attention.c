/* PagedAttention decode for the CPU, in C: the paper's kernel (section 4.1, Fig. 5)
 * the way vLLM's CPU build runs it, reading every key and value where it lies in its
 * block instead of first gathering a contiguous copy.
 *
 * One task per sequence (OpenMP spreads them over the cores). For each KV head, and
 * for each of the `group` query heads that share it (grouped-query attention):
 *   1. walk the block table, scoring the query against every key of the context;
 *   2. softmax the scores exactly (subtract their max first);
 *   3. walk the block table again, summing the value rows weighted by probability.
 * Decode attention is bound by memory: the first query head of a group brings the
 * sequence's keys (a few hundred KB at most) into the core's cache and the others
 * reuse them, so each K/V byte comes from memory about once per step.
 *
 * Invariant: only slots 0 .. context_len - 1 of a sequence are read. The tail of its
 * last block, and the block-table entries past its last block, may hold anything.
 *
 * Layout (DESIGN.md section 3), row-major, contiguous, float32:
 *   query        [num_seqs, num_heads, head_dim]
 *   key_cache    [num_blocks, block_size, num_kv_heads, head_dim]   (value_cache alike)
 *   block_tables [num_seqs, table_stride]  int64 block ids
 *   context_lens [num_seqs]                int64, each >= 1
 *   out          [num_seqs, num_heads, head_dim]
 * head_dim must be a multiple of 8 (the vector width below). Query head h reads KV head
 * h / group (the order of repeat_interleave).
 *
 * Threads: built against the libgomp.so.1 torch has already loaded, so the tasks run on
 * torch's own OpenMP workers (torch.set_num_threads applies) rather than on a second
 * pool that would compete with them for the cores.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 8 floats: one AVX register; GCC's vector extension, so no intrinsics are needed and
 * the compiler picks the instructions of the machine it builds on (-march=native). */
typedef float v8 __attribute__((vector_size(32)));
#define MAX_VECS 32 /* head_dim <= 256 */

static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 r) { memcpy(p, &r, sizeof r); }
static inline float sum8(v8 a) { return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7]; }

/* scores[t] = scale * q . k_t for the n tokens of one KV head; k rows are `row` apart */
static void score_keys(const float *q, float scale, const float *key_cache,
                       const int64_t *table, int64_t n, int block_size, int64_t row,
                       int nv, float *scores) {
    v8 qv[MAX_VECS];
    for (int i = 0; i < nv; ++i) qv[i] = load8(q + 8 * i) * scale;
    for (int64_t t0 = 0, b = 0; t0 < n; t0 += block_size, ++b) {
        const int64_t m = n - t0 < block_size ? n - t0 : block_size;
        const float *k = key_cache + table[b] * block_size * row;
        int64_t j = 0;
        for (; j + 4 <= m; j += 4) {            /* 4 keys at once: independent FMA chains */
            const float *k0 = k + j * row, *k1 = k0 + row, *k2 = k1 + row, *k3 = k2 + row;
            v8 a0 = qv[0] * load8(k0), a1 = qv[0] * load8(k1);
            v8 a2 = qv[0] * load8(k2), a3 = qv[0] * load8(k3);
            for (int i = 1; i < nv; ++i) {
                a0 += qv[i] * load8(k0 + 8 * i);
                a1 += qv[i] * load8(k1 + 8 * i);
                a2 += qv[i] * load8(k2 + 8 * i);
                a3 += qv[i] * load8(k3 + 8 * i);
            }
            scores[t0 + j] = sum8(a0);
            scores[t0 + j + 1] = sum8(a1);
            scores[t0 + j + 2] = sum8(a2);
            scores[t0 + j + 3] = sum8(a3);
        }
        for (; j < m; ++j) {
            const float *kj = k + j * row;
            v8 a = qv[0] * load8(kj);
            for (int i = 1; i < nv; ++i) a += qv[i] * load8(kj + 8 * i);
            scores[t0 + j] = sum8(a);
        }
    }
}

/* scores -> probabilities, in place */
static void softmax(float *scores, int64_t n) {
    float mx = scores[0];
    for (int64_t t = 1; t < n; ++t) mx = scores[t] > mx ? scores[t] : mx;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; ++t) {
        scores[t] = expf(scores[t] - mx);
        total += scores[t];
    }
    const float inv = 1.0f / total;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) scores[t] *= inv;
}

/* out = sum_t probs[t] * v_t for the n tokens of one KV head */
static void weigh_values(const float *probs, const float *value_cache, const int64_t *table,
                         int64_t n, int block_size, int64_t row, int nv, float *out) {
    v8 acc[MAX_VECS];
    for (int i = 0; i < nv; ++i) acc[i] = (v8){0};
    for (int64_t t0 = 0, b = 0; t0 < n; t0 += block_size, ++b) {
        const int64_t m = n - t0 < block_size ? n - t0 : block_size;
        const float *v = value_cache + table[b] * block_size * row;
        for (int64_t j = 0; j < m; ++j, v += row) {
            const float p = probs[t0 + j];
            for (int i = 0; i < nv; ++i) acc[i] += p * load8(v + 8 * i);
        }
    }
    for (int i = 0; i < nv; ++i) store8(out + 8 * i, acc[i]);
}

/* Returns 0, or -1 if head_dim is not a multiple of 8 in 8 .. 8 * MAX_VECS. */
int paged_attention_decode_f32(const float *query, const float *key_cache,
                               const float *value_cache, const int64_t *block_tables,
                               int64_t table_stride, const int64_t *context_lens, float *out,
                               int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                               int block_size, int64_t max_context_len, float scale) {
    if (head_dim % 8 || head_dim < 8 || head_dim > 8 * MAX_VECS) return -1;
    const int nv = head_dim / 8;
    const int group = num_heads / num_kv_heads;
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* one token's K (or V) */

#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (max_context_len > 0 ? max_context_len : 1));
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < num_seqs; ++s) {
            const int64_t n = context_lens[s];
            const int64_t *table = block_tables + (int64_t)s * table_stride;
            for (int h = 0; h < num_heads; ++h) {
                const int64_t offset = (int64_t)(h / group) * head_dim; /* its KV head */
                const int64_t at = ((int64_t)s * num_heads + h) * head_dim;
                score_keys(query + at, scale, key_cache + offset, table, n, block_size, row,
                           nv, scores);
                softmax(scores, n);
                weigh_values(scores, value_cache + offset, table, n, block_size, row, nv,
                             out + at);
            }
        }
        free(scores);
    }
    return 0;
}

/* reshape_and_cache: token i's key and value rows go to flat slot slots[i] of the caches
 * (slot = block * block_size + offset); a slot of -1 means "not cached" (skipped). */
void write_kv_f32(const float *key, const float *value, int64_t in_stride_k,
                  int64_t in_stride_v, float *key_cache, float *value_cache,
                  const int64_t *slots, int64_t num_tokens, int64_t row) {
    for (int64_t i = 0; i < num_tokens; ++i) {
        if (slots[i] < 0) continue;
        memcpy(key_cache + slots[i] * row, key + i * in_stride_k, sizeof(float) * row);
        memcpy(value_cache + slots[i] * row, value + i * in_stride_v, sizeof(float) * row);
    }
}
