/* A LLaMA model's whole decode step, every layer, in one call from Python: the CPU's
 * counterpart of the CUDA graphs vLLM captures for its decode steps.
 *
 * Not the paper's subject; it is how the engine keeps the interpreter out of the step
 * that dominates generation. Python runs a decode layer as ten calls into the C kernels
 * (norm, QKV product, rotary, cache write, paged attention, output product, norm,
 * gate+up product, SiLU x up, down product), each wrapped in checks, views and
 * allocations. Timed alone, with everything warm, that wrapping is ~17 us around a
 * linear layer; inside a step it is 85-145 us, because the paged attention has just
 * streamed megabytes of K/V through the caches and the interpreter's code and objects
 * come back from memory (measured on the Zen 4-class host of 2026-12-06, after a 48 MB
 * stream). Here the same kernels are called in the same order through function
 * pointers, with nothing between them.
 *
 * This file computes nothing itself: the kernels are the ones the Python forward calls
 * (cpu_layers.c, cpu_4bit_linear.c, cpu_paged_attention.c, each built with its own
 * flags), handed over as function pointers, so the hidden states are bit for bit those
 * of the Python forward.
 *
 * Invariant: the caller (minipaged/models/fused_decode.py) has checked every pointer
 * and shape this reads: the block tables and slots lie inside the caches, the weights
 * have their exact 4-bit form, and the buffers hold T rows of their width.
 */
#include <stdint.h>
#include <string.h>

typedef void (*rms_norm_fn)(float *out, const float *x, float *residual, const float *weight,
                            int64_t rows, int64_t n, int64_t stride, float eps);
typedef void (*linear_fn)(float *y, const float *x, int64_t ldx, const uint8_t *w,
                          const float *bias, int64_t m, int64_t n, int64_t k);
typedef void (*rotary_fn)(float *x, int64_t tokens, int64_t token_stride, int64_t heads,
                          int64_t head_dim, const float *cos, const float *sin);
typedef void (*write_kv_fn)(const float *key, const float *value, int64_t stride_k,
                            int64_t stride_v, float *key_cache, float *value_cache,
                            const int64_t *slots, int64_t tokens, int64_t row);
typedef int (*attention_fn)(const float *query, int64_t query_stride, const float *key_cache,
                            const float *value_cache, const int64_t *tables,
                            int64_t table_stride, const int64_t *lens, float *out,
                            int num_seqs, int heads, int kv_heads, int head_dim,
                            int block_size, float scale);
typedef void (*silu_mul_fn)(float *out, const float *gate_up, int64_t rows, int64_t n,
                            int64_t stride);

typedef struct {            /* the kernels, from their own libraries */
    rms_norm_fn rms_norm;
    linear_fn linear;
    rotary_fn rotary;
    write_kv_fn write_kv;
    attention_fn attention;
    silu_mul_fn silu_mul;
} Kernels;

typedef struct {            /* one decoder layer's weights and cache */
    const float *input_norm, *post_norm;
    const uint8_t *qkv, *o, *gate_up, *down;                  /* packed 4-bit forms */
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* or NULL */
    float *key_cache, *value_cache;
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
} Dims;

typedef struct {            /* T rows each, of the width in brackets */
    float *residual;        /* [hidden] the residual stream */
    float *x;               /* [hidden] a sublayer's output, added to the stream next */
    float *normed;          /* [hidden] */
    float *qkv;             /* [(heads + 2 kv_heads) head_dim] q | k | v */
    float *attn;            /* [heads head_dim] */
    float *gate_up;         /* [2 intermediate] */
    float *act;             /* [intermediate] */
} Work;

/* Embedded tokens [T, hidden] -> (work->x, work->residual) after the last layer: the
 * model's final norm of their sum is the caller's (as in LlamaForCausalLM.forward).
 * The new keys and values are written into each layer's cache at `slots`. Returns 0, or
 * the attention kernel's nonzero status (nothing after that layer ran). */
int llama_decode_step_f32(const Kernels *k, const Layer *layers, int64_t num_layers,
                          const Dims *d, const float *embedded, int64_t T, const float *cos,
                          const float *sin, const int64_t *slots, const int64_t *tables,
                          int64_t table_stride, const int64_t *lens, const Work *w) {
    const int64_t H = d->hidden, I = d->intermediate;
    const int64_t q_size = d->heads * d->head_dim, kv_size = d->kv_heads * d->head_dim;
    const int64_t qkv_n = q_size + 2 * kv_size;
    memcpy(w->residual, embedded, sizeof(float) * T * H);
    for (int64_t l = 0; l < num_layers; ++l) {
        const Layer *L = layers + l;
        /* the first layer norms the embeddings; later ones add the MLP's output first */
        if (l == 0)
            k->rms_norm(w->normed, w->residual, NULL, L->input_norm, T, H, H, d->eps);
        else
            k->rms_norm(w->normed, w->x, w->residual, L->input_norm, T, H, H, d->eps);
        k->linear(w->qkv, w->normed, H, L->qkv, L->qkv_bias, T, qkv_n, H);
        /* q and k are adjacent in each row: rotated together, in place */
        k->rotary(w->qkv, T, qkv_n, d->heads + d->kv_heads, d->head_dim, cos, sin);
        k->write_kv(w->qkv + q_size, w->qkv + q_size + kv_size, qkv_n, qkv_n, L->key_cache,
                    L->value_cache, slots, T, kv_size);
        const int status = k->attention(w->qkv, qkv_n, L->key_cache, L->value_cache, tables,
                                        table_stride, lens, w->attn, (int)T, (int)d->heads,
                                        (int)d->kv_heads, (int)d->head_dim,
                                        (int)d->block_size, d->scale);
        if (status) return status;
        k->linear(w->x, w->attn, q_size, L->o, L->o_bias, T, H, q_size);
        k->rms_norm(w->normed, w->x, w->residual, L->post_norm, T, H, H, d->eps);
        k->linear(w->gate_up, w->normed, H, L->gate_up, L->gate_up_bias, T, 2 * I, H);
        k->silu_mul(w->act, w->gate_up, T, I, 2 * I);
        k->linear(w->x, w->act, I, L->down, L->down_bias, T, H, I);
    }
    return 0;
}
