/* PagedAttention decode for the CPU, in C: the paper's kernel (section 4.1, Fig. 5)
 * the way vLLM's CPU build runs it, reading every key and value where it lies in its
 * block instead of first gathering a contiguous copy.
 *
 * One task per sequence (OpenMP spreads them over the cores). The task walks the
 * sequence's block table once; for each block, and for the query heads of each KV head
 * a chunk at a time, it
 *   1. scores the chunk's heads against the block's keys (their KV head's slice of each
 *      key row: grouped-query attention), each key vector loaded once for all of them;
 *   2. folds each head's scores into its running softmax (online softmax, as in
 *      FlashAttention: keep each head's running max and sum, rescale the partial output
 *      when the max grows), so the probabilities of the block are final for this block;
 *   3. adds the block's value rows, weighted by those probabilities, each value vector
 *      loaded once for the chunk's heads.
 * Meanwhile it asks for the blocks it will read next (the sequence's next blocks, or
 * the first blocks of the sequence it will likely take next), a few cache lines per
 * step of its work: the block after next into the L2 cache, the next one (already on
 * its way to L2) into L1. The blocks of a sequence lie anywhere in the cache, where the
 * hardware prefetcher, which follows addresses in a line, cannot guess them.
 * Prefetching the next block into L1 doubled the kernel's speed on a Zen 5 EPYC
 * (benchmarks/kernels.py); on a Zen 4-class EPYC (2026-12-06), asking for the block
 * after next as well, into L2, where more misses can be in flight than in L1, made it
 * another ~25 % faster (1.93 -> 1.46 ms for a layer of 64 sequences of ~240 tokens
 * from memory). Loading each key and value vector once per chunk of heads rather than
 * once per head, with the prefetches spread over the finer steps that work now has,
 * made it another 1.12-1.17x faster on SmolLM2's shapes (3 query heads per KV head;
 * 1.44x with 12 heads of their own at 64 sequences, 0.93-0.95x on a small batch of
 * those that fits in the caches) on the same host; a first version
 * that prefetched a third of a block at a time was 0.93-0.98x: with the loads from L1
 * halved, it had become the prefetch bursts that stalled.
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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 8 floats: one AVX register; GCC's vector extension, so no intrinsics are needed and
 * the compiler picks the instructions of the machine it builds on (-march=native). */
typedef float v8 __attribute__((vector_size(32)));
#define MAX_VECS 32 /* head_dim <= 256 */

static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 r) { memcpy(p, &r, sizeof r); }

/* SHUFFLE(a, b, i0, ..., i7): lane k of the result is lane ik of the 16 lanes a ++ b.
 * Clang (and GCC from 12) spell it __builtin_shufflevector; GCC since 4.7 has
 * __builtin_shuffle with the indices as a vector. */
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* What a key row past the context reads instead: score lanes of missing tokens are
 * computed from zeros (and never used), so no slot past context_len is touched. */
static const float ZERO_ROW[8 * MAX_VECS];

/* The eight sums of eight vectors' lanes, as one vector: r[t] = sum of p[t]'s lanes.
 * A transposing tree of shuffles and adds (7 of each), where summing each vector on
 * its own would take 8 x 7 scalar adds. */
static inline v8 sum_lanes8(const v8 p[8]) {
    v8 t[4], u[2];
    for (int i = 0; i < 4; ++i) /* lanes 2k, 2k+1 of p[2i] and p[2i+1], interleaved */
        t[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               SHUFFLE(p[2 * i], p[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i)
        u[i] = SHUFFLE(t[2 * i], t[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               SHUFFLE(t[2 * i], t[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUFFLE(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* The blocks the task will read next, asked for a few cache lines at a time while it
 * works on the current one: the next block into L1, the block after next into L2
 * (where more misses can be in flight at once). Spread over the block's work rather
 * than issued at once: a burst of several hundred requests would stall on the core's
 * few miss buffers. Separate fields, not an array of two: GCC 12 dropped the prefetches
 * of a loop over such an array. */
typedef struct {
    const float *k_l1, *v_l1, *k_l2, *v_l2; /* NULL where there is no such block */
    int64_t lines, done, per_step;          /* 64-byte lines per block; issued; per call */
} Prefetch;

static inline void prefetch_step(Prefetch *pf) {
    const int64_t first = pf->done;
    const int64_t last = first + pf->per_step < pf->lines ? first + pf->per_step : pf->lines;
    if (pf->k_l2)
        for (int64_t i = first; i < last; ++i) {
            __builtin_prefetch(pf->k_l2 + 16 * i, 0, 2);
            __builtin_prefetch(pf->v_l2 + 16 * i, 0, 2);
        }
    if (pf->k_l1)
        for (int64_t i = first; i < last; ++i) {
            __builtin_prefetch(pf->k_l1 + 16 * i, 0, 3);
            __builtin_prefetch(pf->v_l1 + 16 * i, 0, 3);
        }
    pf->done = last;
}

/* Query heads scored and weighed together: the `group` query heads of grouped-query
 * attention read the same key and value slices, so each vector loaded from a key or
 * value row feeds one multiply-add per head of the chunk instead of one. With one head
 * at a time the kernel was bound by the core's loads from L1, not by memory or by its
 * multiply-adds. With AVX-512's 32 vector registers a chunk is up to 3 heads (24
 * accumulators for 8 keys); with AVX2's 16, one. */
#if defined(__AVX512VL__)
#define MAX_CHUNK 3
#else
#define MAX_CHUNK 1
#endif

/* scores[c][j] = q_c . k_j (q pre-scaled, nv vectors per head, heads nv apart) for the
 * block's keys j < m of one KV head and the chunk's `ht` query heads (`k` points at that
 * KV head's slice of row 0; rows are `row` floats apart), eight keys at a time: each
 * key and head gets its own accumulator, so 8 x ht FMA chains run side by side, and the
 * eight dot products of a head are finished together by sum_lanes8. Each score row
 * (score_stride floats apart) must have room for m rounded up to a multiple of 8. */
static inline __attribute__((always_inline)) void score_heads(
        const v8 *q, const int ht, const float *k, int64_t m, int64_t row, int nv,
        float *scores, int64_t score_stride, Prefetch *pf) {
    for (int64_t j0 = 0; j0 < m; j0 += 8) {
        prefetch_step(pf);
        const float *kt[8];
        for (int t = 0; t < 8; ++t) kt[t] = j0 + t < m ? k + (j0 + t) * row : ZERO_ROW;
        v8 p[MAX_CHUNK][8];
        for (int c = 0; c < ht; ++c)
            for (int t = 0; t < 8; ++t) p[c][t] = (v8){0};
        for (int i = 0; i < nv; ++i) {
            v8 qi[MAX_CHUNK];
            for (int c = 0; c < ht; ++c) qi[c] = q[c * nv + i];
            for (int t = 0; t < 8; ++t) {
                const v8 kv = load8(kt[t] + 8 * i);
                for (int c = 0; c < ht; ++c) p[c][t] += qi[c] * kv;
            }
        }
        for (int c = 0; c < ht; ++c) store8(scores + c * score_stride + j0, sum_lanes8(p[c]));
    }
}

/* acc_c += sum over j < m of probs_c[j] * v_j for the chunk's ht query heads (`v` as
 * `k` above; probability rows score_stride floats apart, accumulators nv apart). The
 * output vectors are the outer loop, so they stay in registers for the whole block, two
 * at a time per head, each fed by two chains of FMAs over alternate keys. */
static inline __attribute__((always_inline)) void weigh_heads(
        const float *probs, int64_t score_stride, const int ht, const float *v, int64_t m,
        int64_t row, int nv, v8 *acc, Prefetch *pf) {
    int i = 0;
    for (; i + 2 <= nv; i += 2) {
        prefetch_step(pf);
        v8 a0[MAX_CHUNK], a1[MAX_CHUNK], b0[MAX_CHUNK], b1[MAX_CHUNK];
        for (int c = 0; c < ht; ++c) {
            a0[c] = acc[c * nv + i];
            a1[c] = acc[c * nv + i + 1];
            b0[c] = b1[c] = (v8){0};
        }
        int64_t j = 0;
        for (; j + 2 <= m; j += 2) {
            const float *v0 = v + j * row + 8 * i, *v1 = v0 + row;
            const v8 x00 = load8(v0), x01 = load8(v0 + 8), x10 = load8(v1), x11 = load8(v1 + 8);
            for (int c = 0; c < ht; ++c) {
                const float *pc = probs + c * score_stride;
                a0[c] += pc[j] * x00;
                a1[c] += pc[j] * x01;
                b0[c] += pc[j + 1] * x10;
                b1[c] += pc[j + 1] * x11;
            }
        }
        if (j < m) {
            const float *v0 = v + j * row + 8 * i;
            const v8 x00 = load8(v0), x01 = load8(v0 + 8);
            for (int c = 0; c < ht; ++c) {
                a0[c] += probs[c * score_stride + j] * x00;
                a1[c] += probs[c * score_stride + j] * x01;
            }
        }
        for (int c = 0; c < ht; ++c) {
            acc[c * nv + i] = a0[c] + b0[c];
            acc[c * nv + i + 1] = a1[c] + b1[c];
        }
    }
    if (i < nv) {
        prefetch_step(pf);
        v8 a0[MAX_CHUNK], b0[MAX_CHUNK];
        for (int c = 0; c < ht; ++c) {
            a0[c] = acc[c * nv + i];
            b0[c] = (v8){0};
        }
        int64_t j = 0;
        for (; j + 2 <= m; j += 2) {
            const v8 x0 = load8(v + j * row + 8 * i), x1 = load8(v + (j + 1) * row + 8 * i);
            for (int c = 0; c < ht; ++c) {
                a0[c] += probs[c * score_stride + j] * x0;
                b0[c] += probs[c * score_stride + j + 1] * x1;
            }
        }
        if (j < m) {
            const v8 x0 = load8(v + j * row + 8 * i);
            for (int c = 0; c < ht; ++c) a0[c] += probs[c * score_stride + j] * x0;
        }
        for (int c = 0; c < ht; ++c) acc[c * nv + i] = a0[c] + b0[c];
    }
}

/* One chunk of ht (1 .. MAX_CHUNK) query heads, with ht a constant in each copy, so the
 * loops over the chunk unroll and the accumulators stay in registers. */
#define CHUNK_CASE(n) \
    case n: score_heads(q, n, k, m, row, nv, scores, score_stride, pf); break;
static void score_chunk(const v8 *q, int ht, const float *k, int64_t m, int64_t row, int nv,
                        float *scores, int64_t score_stride, Prefetch *pf) {
    switch (ht) {
        CHUNK_CASE(1)
#if MAX_CHUNK >= 3
        CHUNK_CASE(2) CHUNK_CASE(3)
#endif
    }
}
#undef CHUNK_CASE
#define CHUNK_CASE(n) \
    case n: weigh_heads(probs, score_stride, n, v, m, row, nv, acc, pf); break;
static void weigh_chunk(const float *probs, int64_t score_stride, int ht, const float *v,
                        int64_t m, int64_t row, int nv, v8 *acc, Prefetch *pf) {
    switch (ht) {
        CHUNK_CASE(1)
#if MAX_CHUNK >= 3
        CHUNK_CASE(2) CHUNK_CASE(3)
#endif
    }
}
#undef CHUNK_CASE

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

/* The block `ahead` blocks after block b of sequence s (of nb blocks) in the order this
 * thread will likely read them: later in s, else early in the sequence `threads` on
 * (dynamic scheduling usually hands it that one); -1 if there is none. */
static inline int64_t block_ahead(const int64_t *block_tables, int64_t table_stride,
                                  const int64_t *context_lens, int block_size, int num_seqs,
                                  int s, int threads, int64_t b, int64_t nb, int64_t ahead) {
    if (b + ahead < nb) return block_tables[(int64_t)s * table_stride + b + ahead];
    const int other = s + threads;
    if (other >= num_seqs) return -1;
    const int64_t i = b + ahead - nb;   /* 0 or 1: block i exists if the context reaches it */
    return i * block_size < context_lens[other]
               ? block_tables[(int64_t)other * table_stride + i] : -1;
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
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* floats per token */
    const int64_t block_floats = block_size * row;
    const size_t vecs = (size_t)num_heads * nv;
    const int score_stride = (block_size + 7) / 8 * 8; /* score_heads writes 8 at a time */
    /* chunks of query heads per block: each KV head's group, MAX_CHUNK heads at a time */
    const int64_t chunks = (int64_t)num_kv_heads * ((group + MAX_CHUNK - 1) / MAX_CHUNK);

#pragma omp parallel
    {
        const int threads = omp_get_num_threads();
        float *scores = malloc(sizeof(float) * score_stride * num_heads);
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
            const int64_t nb = (n + block_size - 1) / block_size;
            for (int64_t t0 = 0, b = 0; t0 < n; t0 += block_size, ++b) {
                const int64_t m = n - t0 < block_size ? n - t0 : block_size;
                const float *k = key_cache + table[b] * block_floats;
                const float *v = value_cache + table[b] * block_floats;
                const int64_t next[2] = {
                    block_ahead(block_tables, table_stride, context_lens, block_size,
                                num_seqs, s, threads, b, nb, 1),
                    block_ahead(block_tables, table_stride, context_lens, block_size,
                                num_seqs, s, threads, b, nb, 2)};
                Prefetch pf = {0};
                if (next[0] >= 0) {
                    pf.k_l1 = key_cache + next[0] * block_floats;
                    pf.v_l1 = value_cache + next[0] * block_floats;
                }
                if (next[1] >= 0) {
                    pf.k_l2 = key_cache + next[1] * block_floats;
                    pf.v_l2 = value_cache + next[1] * block_floats;
                }
                pf.lines = (block_floats + 15) / 16;
                /* one step per 8 keys scored and per pair of value vectors weighed */
                const int64_t steps = chunks * ((m + 7) / 8 + (nv + 1) / 2);
                pf.per_step = (pf.lines + steps - 1) / steps;
                /* the query heads of each KV head, a chunk at a time */
                for (int h0 = 0; h0 < num_heads;) {
                    const int in_group = group - h0 % group;
                    const int ht = in_group < MAX_CHUNK ? in_group : MAX_CHUNK;
                    /* query head h reads KV head h / group, at that offset in each row */
                    const int64_t off = (int64_t)(h0 / group) * head_dim;
                    float *sc = scores + h0 * score_stride;
                    score_chunk(qv + h0 * nv, ht, k + off, m, row, nv, sc, score_stride, &pf);
                    for (int c = 0; c < ht; ++c) {
                        const int h = h0 + c;
                        const float alpha = fold_softmax(sc + c * score_stride, m, t0 == 0,
                                                         run_max + h, run_sum + h);
                        if (t0 > 0 && alpha != 1.0f)
                            for (int i = 0; i < nv; ++i) acc[h * nv + i] *= alpha;
                    }
                    weigh_chunk(sc, score_stride, ht, v + off, m, row, nv, acc + h0 * nv, &pf);
                    h0 += ht;
                }
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
