/* PagedAttention decode for the CPU, in C: the paper's kernel (section 4.1, Fig. 5)
 * the way vLLM's CPU build runs it, reading every key and value where it lies in its
 * block instead of first gathering a contiguous copy.
 *
 * One task per sequence (OpenMP spreads them over the cores). The task walks the
 * sequence's block table once; for each block it
 *   1. scores all query heads against the block's keys (a key row holds every KV head
 *      side by side, so the row is read once and each KV head's slice serves the
 *      `group` query heads that share it: grouped-query attention);
 *   2. folds the scores into a running softmax (online softmax, as in FlashAttention:
 *      keep each head's running max and sum, rescale the partial output when the max
 *      grows), so the probabilities of the block are final for this block alone;
 *   3. adds the block's value rows, weighted by those probabilities.
 * Keys and values of a block are used back to back, and the rows of the next block are
 * prefetched one row ahead: decode attention is bound by memory latency, and the few
 * hundred instructions spent on a row would otherwise leave too few loads in flight.
 *
 * Invariant: only slots 0 .. context_len - 1 of a sequence are read. The tail of its
 * last block, and the block-table entries past its last block, may hold anything.
 *
 * Layout (DESIGN.md section 3), row-major, float32:
 *   query        [num_seqs, num_heads, head_dim]  rows query_stride floats apart, the
 *                                                 heads of a row contiguous
 *   key_cache    [num_blocks, block_size, num_kv_heads, head_dim]   (value_cache alike)
 *   block_tables [num_seqs, table_stride]  int64 block ids
 *   context_lens [num_seqs]                int64, each >= 1
 *   out          [num_seqs, num_heads, head_dim]  contiguous
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

/* Ask for one token's row (all KV heads) before it is needed. */
static inline void prefetch_row(const float *p, int64_t row) {
    for (int64_t i = 0; i < row; i += 16) __builtin_prefetch(p + i, 0, 3); /* 64 B lines */
}

/* The row `ahead` rows after row j of this block: in this block, or in the next one
 * (NULL when this is the last block). */
static inline const float *row_ahead(const float *block, const float *next, int64_t j,
                                     int64_t m, int64_t row) {
    const int64_t ahead = j + 1;
    if (ahead < m) return block + ahead * row;
    return next ? next + (ahead - m) * row : NULL;
}

/* scores[h * block_size + j] = q_h . k_j (q pre-scaled) for every query head h and each
 * of the block's m keys. */
static void score_block(const v8 *qv, const float *k, const float *next, int64_t m,
                        int num_kv_heads, int group, int nv, int block_size, float *scores) {
    const int64_t row = (int64_t)num_kv_heads * nv * 8;
    for (int64_t j = 0; j < m; ++j) {
        const float *kj = k + j * row, *later = row_ahead(k, next, j, m, row);
        if (later) prefetch_row(later, row);
        for (int kh = 0; kh < num_kv_heads; ++kh) {
            const float *kk = kj + (int64_t)kh * nv * 8;
            for (int g = 0; g < group; ++g) {
                const int h = kh * group + g;
                const v8 *q = qv + (int64_t)h * nv;
                v8 a0 = q[0] * load8(kk), a1 = (v8){0};
                int i = 1;
                for (; i + 1 < nv; i += 2) { /* two independent FMA chains */
                    a1 += q[i] * load8(kk + 8 * i);
                    a0 += q[i + 1] * load8(kk + 8 * i + 8);
                }
                if (i < nv) a1 += q[i] * load8(kk + 8 * i);
                scores[h * block_size + j] = sum8(a0 + a1);
            }
        }
    }
}

/* acc_h += probs[h * block_size + j] * v_j for every query head h and the m values. */
static void weigh_block(const float *probs, const float *v, const float *next, int64_t m,
                        int num_kv_heads, int group, int nv, int block_size, v8 *acc) {
    const int64_t row = (int64_t)num_kv_heads * nv * 8;
    for (int64_t j = 0; j < m; ++j) {
        const float *vj = v + j * row, *later = row_ahead(v, next, j, m, row);
        if (later) prefetch_row(later, row);
        for (int kh = 0; kh < num_kv_heads; ++kh) {
            const float *vv = vj + (int64_t)kh * nv * 8;
            for (int g = 0; g < group; ++g) {
                const int h = kh * group + g;
                const float p = probs[h * block_size + j];
                v8 *a = acc + (int64_t)h * nv;
                for (int i = 0; i < nv; ++i) a[i] += p * load8(vv + 8 * i);
            }
        }
    }
}

/* Turn one head's m scores of a block into exp(score - running max), updating its
 * running max and sum; returns the factor the head's partial output must be scaled by
 * (exp(old max - new max); 0 on the first block, where there is no partial output).
 * No infinities are involved: -ffast-math may assume there are none. */
static float fold_softmax(float *sc, int64_t m, int first, float *run_max, float *run_sum) {
    float mx = first ? sc[0] : *run_max;
    for (int64_t j = 0; j < m; ++j) mx = sc[j] > mx ? sc[j] : mx;
    const float alpha = first ? 0.0f : expf(*run_max - mx);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < m; ++j) {
        sc[j] = expf(sc[j] - mx);
        total += sc[j];
    }
    *run_sum = *run_sum * alpha + total;
    *run_max = mx;
    return alpha;
}

/* Returns 0, or -1 if head_dim is not a multiple of 8 in 8 .. 8 * MAX_VECS. */
int paged_attention_decode_f32(const float *query, int64_t query_stride,
                               const float *key_cache, const float *value_cache,
                               const int64_t *block_tables, int64_t table_stride,
                               const int64_t *context_lens, float *out, int num_seqs,
                               int num_heads, int num_kv_heads, int head_dim, int block_size,
                               float scale) {
    if (head_dim % 8 || head_dim < 8 || head_dim > 8 * MAX_VECS) return -1;
    const int nv = head_dim / 8;
    const int group = num_heads / num_kv_heads;
    const int64_t block_floats = (int64_t)block_size * num_kv_heads * head_dim;
    const size_t vecs = (size_t)num_heads * nv;

#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * block_size * num_heads);
        float *run_max = malloc(sizeof(float) * num_heads);
        float *run_sum = malloc(sizeof(float) * num_heads);
        v8 *qv = aligned_alloc(32, sizeof(v8) * vecs);   /* v8 needs 32-byte alignment */
        v8 *acc = aligned_alloc(32, sizeof(v8) * vecs);
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < num_seqs; ++s) {
            const int64_t n = context_lens[s];
            const int64_t *table = block_tables + (int64_t)s * table_stride;
            const float *q = query + (int64_t)s * query_stride;
            for (size_t i = 0; i < vecs; ++i) {
                qv[i] = load8(q + 8 * i) * scale;
                acc[i] = (v8){0};
            }
            for (int h = 0; h < num_heads; ++h) run_sum[h] = 0.0f;
            for (int64_t t0 = 0, b = 0; t0 < n; t0 += block_size, ++b) {
                const int64_t m = n - t0 < block_size ? n - t0 : block_size;
                const int last = t0 + block_size >= n;
                const float *k = key_cache + table[b] * block_floats;
                const float *v = value_cache + table[b] * block_floats;
                score_block(qv, k, last ? NULL : key_cache + table[b + 1] * block_floats, m,
                            num_kv_heads, group, nv, block_size, scores);
                for (int h = 0; h < num_heads; ++h) {
                    const float alpha = fold_softmax(scores + h * block_size, m, t0 == 0,
                                                     run_max + h, run_sum + h);
                    if (t0 > 0 && alpha != 1.0f)
                        for (int i = 0; i < nv; ++i) acc[h * nv + i] *= alpha;
                }
                weigh_block(scores, v, last ? NULL : value_cache + table[b + 1] * block_floats,
                            m, num_kv_heads, group, nv, block_size, acc);
            }
            float *o = out + (int64_t)s * num_heads * head_dim;
            for (int h = 0; h < num_heads; ++h) {
                const float inv = 1.0f / run_sum[h];
                for (int i = 0; i < nv; ++i) store8(o + 8 * (h * nv + i), acc[h * nv + i] * inv);
            }
        }
        free(acc);
        free(qv);
        free(run_sum);
        free(run_max);
        free(scores);
    }
    return 0;
}

/* reshape_and_cache: token i's key and value rows go to flat slot slots[i] of the caches
 * (slot = block * block_size + offset); a slot of -1 means "not cached" (skipped). */
void write_kv_f32(const float *key, const float *value, int64_t in_stride_k,
                  int64_t in_stride_v, float *key_cache, float *value_cache,
                  const int64_t *slots, int64_t num_tokens, int64_t row) {
    /* rows land in scattered blocks: two threads keep twice as many writes in flight */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < num_tokens; ++i) {
        if (slots[i] < 0) continue;
        memcpy(key_cache + slots[i] * row, key + i * in_stride_k, sizeof(float) * row);
        memcpy(value_cache + slots[i] * row, value + i * in_stride_v, sizeof(float) * row);
    }
}
