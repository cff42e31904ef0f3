/* PagedAttention for the prompt (prefill) on the CPU, in C: each new token attends
 * causally over its sequence's context, read where it lies in the sequence's blocks
 * (paper section 4.1; with a cached prefix or a chunked prefill, the first context
 * tokens are old and only the last ones are new queries).
 *
 * Unlike decode, a prefill has many queries per sequence, so the work is a small
 * matrix product and is bound by arithmetic, not memory. The kernel is blocked the way
 * FlashAttention is: one task takes ROWS query rows, a tile of ROWS / group new tokens
 * of one sequence times the `group` query heads that share one KV head (grouped-query
 * attention: all its rows read the same keys), holds them transposed ([head_dim][ROWS],
 * so 8 rows fill one vector), and walks the sequence's blocks up to the tile's last
 * position. For each block it
 *   1. scores every key of the block against all the tile's rows: for each key and
 *      dimension, one broadcast key value times the rows' vector (8 keys x 3 vectors of
 *      16 rows: 24 accumulators in registers, one AVX-512 register each);
 *   2. masks keys after each query's position (only the blocks on the diagonal have
 *      any) and folds the scores into each row's running softmax (online softmax:
 *      running max and sum; the partial output is rescaled when the max grows), with
 *      the rows in the vector lanes;
 *   3. adds the block's value rows weighted by the probabilities (6 rows at a time
 *      with 16-float vectors for head_dim 64, 3 for 128, else 2 rows with 8).
 * The 16-float vectors (GCC's vector extension) are one AVX-512 register where the CPU
 * has them, two AVX2 registers elsewhere; going from 8 to 16 made the kernel ~20 %
 * faster on the Zen 5 EPYC (2026-12-06).
 *
 * Invariant: only slots 0 .. context_len - 1 of a sequence are read; a query at
 * position p sees exactly keys 0..p. Built with -ffast-math, so no infinity appears:
 * masked scores are a large negative finite number whose exponential is 0.
 *
 * Layout (DESIGN.md section 3), row-major, float32:
 *   query        [num_tokens, num_heads, head_dim]  rows query_stride floats apart
 *   key_cache    [num_blocks, block_size, num_kv_heads, head_dim]   (value_cache alike)
 *   block_tables [num_seqs, table_stride]  int64;  context_lens [num_seqs] int64
 *   query_start_loc [num_seqs + 1] int64: sequence s's new tokens are rows
 *                qsl[s] .. qsl[s+1] - 1, the last qsl[s+1] - qsl[s] of its context
 *   out          [num_tokens, num_heads, head_dim]  contiguous
 * head_dim a multiple of 8 up to 256, and group (num_heads / num_kv_heads) a
 * divisor of ROWS; otherwise it declines (returns -1) and the caller uses torch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
#define ROWS 48        /* query rows per task: 3 vectors of 16 (6 of 8) */
#define RV (ROWS / 8)
#define MAX_DIM 256
#define MASKED (-1e30f)

static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 r) { memcpy(p, &r, sizeof r); }
typedef float v16 __attribute__((vector_size(64)));
#define RV16 (ROWS / 16)
static inline v16 load16(const float *p) { v16 r; memcpy(&r, p, sizeof r); return r; }
static inline void store16(float *p, v16 r) { memcpy(p, &r, sizeof r); }

/* One task's working set, per thread (~40 KB at SmolLM2's shapes). */
typedef struct {
    float *qt;         /* [dim][ROWS] the tile's query rows, pre-scaled, transposed */
    float *o;          /* [ROWS][dim] their partial outputs */
    float *s;          /* [bs][ROWS] scores, then probabilities, of one block */
    float *run_max, *run_sum, *alpha, *pos;  /* [ROWS] each; pos: the row's position */
} Work;

static Work work_alloc(int dim, int bs) {
    Work w;
    w.qt = malloc(sizeof(float) * ((size_t)ROWS * (2 * dim + bs + 4)));
    w.o = w.qt + (size_t)ROWS * dim;
    w.s = w.o + (size_t)ROWS * dim;
    w.run_max = w.s + (size_t)ROWS * bs;
    w.run_sum = w.run_max + ROWS;
    w.alpha = w.run_sum + ROWS;
    w.pos = w.alpha + ROWS;
    return w;
}

/* s[j][r] = q_r . k_j for the block's m keys (rows `row` floats apart) and all ROWS
 * rows; eight keys at a time: the three vectors of 16 query rows are loaded once per
 * dimension and serve 8 broadcast key values, 24 accumulators in registers (with 4
 * keys at a time the compiler re-read the query vectors from L1 for every key, and
 * the loads, not the multiply-adds, set the pace: 8 keys made the kernel ~17 %
 * faster on a Zen 4-class EPYC, 2026-12-06). */
#define KEYS 8
static void score_block(const Work *w, const float *k, int64_t row, int64_t m, int dim) {
    int64_t j = 0;
    for (; j + KEYS <= m; j += KEYS) {
        v16 acc[KEYS][RV16];
        for (int t = 0; t < KEYS; ++t)
            for (int i = 0; i < RV16; ++i) acc[t][i] = (v16){0};
        for (int d = 0; d < dim; ++d) {
            v16 qq[RV16];
            for (int i = 0; i < RV16; ++i) qq[i] = load16(w->qt + (int64_t)d * ROWS + 16 * i);
            for (int t = 0; t < KEYS; ++t) {
                const float kv = k[(j + t) * row + d];
                for (int i = 0; i < RV16; ++i) acc[t][i] += kv * qq[i];
            }
        }
        for (int t = 0; t < KEYS; ++t)
            for (int i = 0; i < RV16; ++i) store16(w->s + (j + t) * ROWS + 16 * i, acc[t][i]);
    }
    for (; j < m; ++j) {
        const float *k0 = k + j * row;
        v16 a[RV16] = {{0}};
        for (int d = 0; d < dim; ++d)
            for (int i = 0; i < RV16; ++i) a[i] += k0[d] * load16(w->qt + (int64_t)d * ROWS + 16 * i);
        for (int i = 0; i < RV16; ++i) store16(w->s + j * ROWS + 16 * i, a[i]);
    }
}

/* As weigh_rows_nv below with 16-float vectors (head_dim a multiple of 16: nv16 =
 * head_dim / 16), for all ROWS rows (a short tile's padding rows too: their outputs
 * are dropped, and no row count to test in the inner loop), `per` rows at a time: per
 * x nv16 accumulators, each value vector loaded once for the `per` rows. */
static inline __attribute__((always_inline)) void weigh_all_rows_nv16(
        Work *w, const float *v, int64_t row, int64_t m, const int nv16, const int per) {
    const int dim = nv16 * 16;
    for (int r = 0; r < ROWS; r += per) {
        v16 acc[6][8];                  /* per x nv16 of them are used: 24 at most */
        for (int t = 0; t < per; ++t) {
            const float al = w->alpha[r + t];
            for (int i = 0; i < nv16; ++i)
                acc[t][i] = load16(w->o + (int64_t)(r + t) * dim + 16 * i) * al;
        }
        for (int64_t j = 0; j < m; ++j) {
            const float *vj = v + j * row, *sj = w->s + j * ROWS + r;
            v16 vv[8];
            for (int i = 0; i < nv16; ++i) vv[i] = load16(vj + 16 * i);
            for (int t = 0; t < per; ++t)
                for (int i = 0; i < nv16; ++i) acc[t][i] += sj[t] * vv[i];
        }
        for (int t = 0; t < per; ++t)
            for (int i = 0; i < nv16; ++i) store16(w->o + (int64_t)(r + t) * dim + 16 * i, acc[t][i]);
    }
}

/* o_r = alpha_r * o_r + sum_j p_rj v_j over the block's m values (v rows `row` apart),
 * two rows at a time so each value vector loaded serves both. Inlined with nv (head_dim
 * / 8) a constant where it is a common one, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void weigh_rows_nv(
        Work *w, const float *v, int64_t row, int64_t m, int rows, const int nv) {
    const int dim = nv * 8;
    for (int r = 0; r < rows; r += 2) {
        const int two = r + 1 < rows;
        v8 a[MAX_DIM / 8], b[MAX_DIM / 8];
        float *o0 = w->o + (int64_t)r * dim, *o1 = o0 + dim;
        const float al0 = w->alpha[r], al1 = two ? w->alpha[r + 1] : 0.0f;
        for (int i = 0; i < nv; ++i) {
            a[i] = load8(o0 + 8 * i) * al0;
            b[i] = two ? load8(o1 + 8 * i) * al1 : (v8){0};
        }
        for (int64_t j = 0; j < m; ++j) {
            const float *vj = v + j * row;
            const float x = w->s[j * ROWS + r], y = two ? w->s[j * ROWS + r + 1] : 0.0f;
            for (int i = 0; i < nv; ++i) {
                const v8 vv = load8(vj + 8 * i);
                a[i] += x * vv;
                b[i] += y * vv;
            }
        }
        for (int i = 0; i < nv; ++i) {
            store8(o0 + 8 * i, a[i]);
            if (two) store8(o1 + 8 * i, b[i]);
        }
    }
}

/* The common head sizes get constant loop bounds (accumulators in registers, 24 at
 * most): 6 rows at a time for head_dim 64 took ~8 % off the kernel against 4 rows. */
static void weigh_rows(Work *w, const float *v, int64_t row, int64_t m, int rows, int dim) {
    if (dim == 64) weigh_all_rows_nv16(w, v, row, m, 4, 6);
    else if (dim == 128) weigh_all_rows_nv16(w, v, row, m, 8, 3);
    else weigh_rows_nv(w, v, row, m, rows, dim / 8);
}

/* exp(d), or 0 where d < -87 (there exp(d) < 2^-125, below anything a sum of
 * probabilities of at least 1 can hold). The argument is clamped first: the vector expf
 * takes a slow scalar path for any lane out of its range, and the masked scores
 * (MASKED - max) and the first block's rescale (from MASKED) are far out of it: this
 * made the kernel ~8 % faster on the Zen 4-class EPYC (2026-12-06), bit-identical on its
 * test shapes (only a term below 2^-125 could differ, and a sum of at least 1 drops it). */
static inline float exp_or_zero(float d) {
    return d < -87.0f ? 0.0f : expf(d < -87.0f ? -87.0f : d);
}

/* Mask keys t0 + j past each row's position, then fold the block's m keys into the
 * rows' running softmax: s becomes exp(s - new max), alpha the old part's rescale.
 * Every loop runs over the ROWS rows, which the compiler puts in vector lanes. */
static void fold_block(Work *w, int64_t t0, int64_t m, int diagonal) {
    float mx[ROWS];
    for (int r = 0; r < ROWS; ++r) mx[r] = w->run_max[r];
    for (int64_t j = 0; j < m; ++j) {
        float *s = w->s + j * ROWS;
        const float key = (float)(t0 + j);       /* positions < 2^24: exact in a float */
        if (diagonal) {
#pragma omp simd
            for (int r = 0; r < ROWS; ++r) s[r] = key > w->pos[r] ? MASKED : s[r];
        }
#pragma omp simd
        for (int r = 0; r < ROWS; ++r) mx[r] = s[r] > mx[r] ? s[r] : mx[r];
    }
    float total[ROWS];
#pragma omp simd
    for (int r = 0; r < ROWS; ++r) {
        w->alpha[r] = exp_or_zero(w->run_max[r] - mx[r]);
        total[r] = 0.0f;
    }
    for (int64_t j = 0; j < m; ++j) {
        float *s = w->s + j * ROWS;
#pragma omp simd
        for (int r = 0; r < ROWS; ++r) {
            s[r] = exp_or_zero(s[r] - mx[r]);
            total[r] += s[r];
        }
    }
#pragma omp simd
    for (int r = 0; r < ROWS; ++r) {
        w->run_sum[r] = w->run_sum[r] * w->alpha[r] + total[r];
        w->run_max[r] = mx[r];
    }
}

/* Returns 0, or -1 if the shapes are outside what the kernel was written for. */
int paged_attention_prefill_f32(const float *query, int64_t query_stride,
                                const float *key_cache, const float *value_cache,
                                const int64_t *block_tables, int64_t table_stride,
                                const int64_t *context_lens, const int64_t *query_start_loc,
                                float *out, int num_seqs, int num_heads, int num_kv_heads,
                                int head_dim, int block_size, float scale) {
    if (num_kv_heads < 1 || num_heads % num_kv_heads) return -1;
    const int group = num_heads / num_kv_heads;
    if (ROWS % group || head_dim % 8 || head_dim > MAX_DIM) return -1;
    const int tile = ROWS / group;                          /* new tokens per task */
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* one token's K (or V) */
    const int64_t block_floats = (int64_t)block_size * row;
    /* tasks: (sequence, tile of its new tokens, KV head), numbered in that order */
    int64_t *first_task = malloc(sizeof(int64_t) * (num_seqs + 1));
    first_task[0] = 0;
    for (int s = 0; s < num_seqs; ++s) {
        const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
        first_task[s + 1] = first_task[s] + (q_len + tile - 1) / tile * num_kv_heads;
    }
    const int64_t num_tasks = first_task[num_seqs];

#pragma omp parallel
    {
        Work work = work_alloc(head_dim, block_size), *w = &work;
        int s = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            while (first_task[s + 1] <= task) ++s;   /* a thread's tasks only increase */
            const int64_t local = task - first_task[s];
            const int kh = (int)(local % num_kv_heads);
            const int64_t j0 = local / num_kv_heads * tile;
            const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
            const int64_t ctx = context_lens[s];
            const int64_t tokens = q_len - j0 < tile ? q_len - j0 : tile;
            const int rows = (int)tokens * group;
            const int64_t *table = block_tables + (int64_t)s * table_stride;
            /* row r = (token jj, head g): query row of token j0 + jj, head kh * group + g;
             * rows past the tile's tokens are zero queries whose outputs are dropped */
            for (int r = 0; r < ROWS; ++r) {
                const int64_t jj = r / group, h = (int64_t)kh * group + r % group;
                const float *q = query + (query_start_loc[s] + j0 + jj) * query_stride +
                                 h * head_dim;
                for (int d = 0; d < head_dim; ++d)
                    w->qt[(int64_t)d * ROWS + r] = r < rows ? q[d] * scale : 0.0f;
                memset(w->o + (int64_t)r * head_dim, 0, sizeof(float) * head_dim);
                w->pos[r] = (float)(ctx - q_len + j0 + (r < rows ? jj : 0));
                w->run_max[r] = MASKED;
                w->run_sum[r] = 0.0f;
            }
            const int64_t first = ctx - q_len + j0;               /* the tile's positions */
            const int64_t last = first + tokens - 1;
            for (int64_t t0 = 0, b = 0; t0 <= last; t0 += block_size, ++b) {
                const int64_t m = last + 1 - t0 < block_size ? last + 1 - t0 : block_size;
                const int64_t at = table[b] * block_floats + (int64_t)kh * head_dim;
                score_block(w, key_cache + at, row, m, head_dim);
                fold_block(w, t0, m, t0 + m - 1 > first);
                weigh_rows(w, value_cache + at, row, m, rows, head_dim);
            }
            for (int r = 0; r < rows; ++r) {
                const int64_t jj = r / group, h = (int64_t)kh * group + r % group;
                float *o = out + ((query_start_loc[s] + j0 + jj) * num_heads + h) * head_dim;
                const float inv = 1.0f / w->run_sum[r];
                for (int d = 0; d < head_dim; ++d) o[d] = w->o[(int64_t)r * head_dim + d] * inv;
            }
        }
        free(work.qt);
    }
    free(first_task);
    return 0;
}
