/* A decode-only step in one call, through the other kernels of this directory: the embedding rows, every
   decoder layer, the final norm and the LM head.

   A batch-1 decode step of a small model is some 300 kernel calls (four matmuls, two norms, rotary, the cache
   write and attention per layer), each a few microseconds of work; made one by one from Python, each also
   costs its dispatch (wrapping tensors, allocating outputs, ctypes), and those costs added up to as much
   again as the kernels. Here the step runs the same kernels, in the same order, on the same buffers a
   layer at a time, so its logits are bit-identical to the layer-by-layer path's; only the calls are
   made from C. The kernels come as function pointers from their own libraries (model/cpu_kernels.py
   passes their addresses): each stays in its own file, built with its own flags.

   bfloat16 activations throughout; every linear projection is llamaserve's bf16, int8 or int4 kernel, and so
   is the LM head where it runs on one (else the step ends at the final norm, and the caller projects). */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { BF16 = 0, INT8 = 1, INT4 = 2 };

typedef void (*gemm_bf16_fn)(const uint16_t *x, int64_t ldx, const uint16_t *packed, uint16_t *y, int64_t m,
                             int64_t n, int64_t k, int threads);
typedef void (*gemm_int8_fn)(const uint16_t *x, int64_t ldx, const int8_t *codes, const float *scales, uint16_t *y,
                             void *scratch, int64_t m, int64_t n, int64_t k, int threads);
typedef void (*gemm_int4_fn)(const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *params,
                             uint16_t *y, float *xsum, int64_t m, int64_t n, int64_t k, int64_t group, int threads);
typedef void (*write_kv_fn)(const void *k, int64_t k_stride, const void *v, int64_t v_stride, const int64_t *slots,
                            int64_t tokens, void *k_cache, void *v_cache, int64_t num_kv_heads, int64_t head_dim,
                            int bf16);
typedef void (*decode_attention_fn)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                    const int64_t *tokens, const int64_t *block_tables, int64_t max_blocks,
                                    const int64_t *seq_lens, int64_t num_seqs, void *out, int64_t block_size,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int bf16,
                                    int threads);
typedef void (*add_rms_norm_fn)(void *residual, const void *delta, const void *weight, void *out, int64_t rows,
                                int64_t hidden, float eps, int bf16, int threads);
typedef void (*silu_mul_fn)(const void *gate_up, void *out, int64_t rows, int64_t inter, int bf16, int threads);
typedef void (*rotary_fn)(void *x, int64_t tokens, int64_t stride, int64_t rotated, int64_t head_dim,
                          const void *cos, const void *sin, int bf16, int threads);

struct kernels { /* addresses of the functions of gemm_*.c, attention.c and layer_ops.c (NULL: not built) */
  gemm_bf16_fn gemm_bf16;
  gemm_int8_fn gemm_int8;
  gemm_int4_fn gemm_int4;
  write_kv_fn write_kv;
  decode_attention_fn decode_attention;
  add_rms_norm_fn add_rms_norm;
  silu_mul_fn silu_mul;
  rotary_fn rotary;
};

struct linear {          /* y [m, n] = x [m, k] @ W^T, W in its kernel's layout */
  int64_t kind;          /* BF16, INT8 or INT4 */
  const void *weight;    /* BF16: the packed weight; INT8, INT4: the codes */
  const void *params;    /* INT8: float32 scales [n]; INT4: bfloat16 scales and minimums; BF16: unused */
  int64_t n, k, group;   /* group: INT4's inputs per scale */
};

struct layer {
  const uint16_t *input_norm, *post_norm; /* [hidden] */
  struct linear qkv, o, gate_up, down;
  void *k_cache, *v_cache; /* [blocks, block_size, kv_heads, head_dim] */
};

struct model {
  struct kernels fn;
  const struct layer *layers;
  int64_t num_layers, hidden, heads, kv_heads, head_dim, inter, block_size, max_k; /* max_k: the largest k */
  float eps, scale; /* the norms' epsilon; attention's 1 / sqrt(head_dim), as the layer-by-layer path rounds it */
  const uint16_t *embedding; /* [vocab, hidden] */
  int64_t vocab;             /* the embedding's rows and the logits' columns */
  const uint16_t *final_norm; /* [hidden] */
  struct linear head;         /* [vocab (or more), hidden]; weight NULL: the caller's to apply */
};

static void linear(const struct kernels *fn, const struct linear *l, const uint16_t *x, uint16_t *y, int64_t m,
                   float *scratch, int threads) {
  switch (l->kind) {
    case BF16: fn->gemm_bf16(x, l->k, l->weight, y, m, l->n, l->k, threads); break;
    case INT8: fn->gemm_int8(x, l->k, l->weight, l->params, y, scratch, m, l->n, l->k, threads); break;
    default: fn->gemm_int4(x, l->k, l->weight, l->params, y, scratch, m, l->n, l->k, l->group, threads); break;
  }
}

static size_t aligned(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Bytes of scratch decode_step needs for m tokens. */
size_t decoder_scratch_bytes(const struct model *model, int64_t m) {
  const int64_t qkv = (model->heads + 2 * model->kv_heads) * model->head_dim;
  return aligned(2 * m * model->hidden) * 4 + aligned(2 * m * qkv) + aligned(2 * m * model->heads * model->head_dim) +
         aligned(2 * m * 2 * model->inter) + aligned(2 * m * model->inter) + aligned(4 * m * model->max_k) +
         aligned(2 * m * model->head.n);
}

/* m tokens, each its sequence's one new token (tokens[s] = s for the m sequences): token ids[t], its rotary cos/sin
   [m, head_dim], cache slot slots[t], blocks tables[t] ([m, max_blocks]) and seq_lens[t] tokens once written.
   Writes logits [m, vocab] float32, or, without a head, the final norm's output to normed_out [m, hidden].
   Returns 0, or -1 (nothing run) for an id outside the vocabulary. */
int decode_step(const struct model *model, const int64_t *ids, int64_t m, const uint16_t *cos, const uint16_t *sin,
                const int64_t *slots, const int64_t *tokens, const int64_t *tables, int64_t max_blocks,
                const int64_t *seq_lens, float *logits, uint16_t *normed_out, void *scratch, int threads) {
  const struct kernels *fn = &model->fn;
  const int64_t hidden = model->hidden, heads = model->heads, kv_heads = model->kv_heads, dim = model->head_dim;
  const int64_t qkv_width = (heads + 2 * kv_heads) * dim;
  for (int64_t t = 0; t < m; t++)
    if (ids[t] < 0 || ids[t] >= model->vocab) return -1;
  char *next = scratch;
  uint16_t *x = (uint16_t *)next; /* the residual stream */
  next += aligned(2 * m * hidden);
  uint16_t *delta = (uint16_t *)next; /* what the last block adds to it */
  next += aligned(2 * m * hidden);
  uint16_t *normed = (uint16_t *)next;
  next += aligned(2 * m * hidden);
  uint16_t *h = (uint16_t *)next; /* the attention block's output */
  next += aligned(2 * m * hidden);
  uint16_t *qkv = (uint16_t *)next;
  next += aligned(2 * m * qkv_width);
  uint16_t *attn = (uint16_t *)next;
  next += aligned(2 * m * heads * dim);
  uint16_t *gate_up = (uint16_t *)next;
  next += aligned(2 * m * 2 * model->inter);
  uint16_t *act = (uint16_t *)next;
  next += aligned(2 * m * model->inter);
  float *gemm_scratch = (float *)next;
  next += aligned(4 * m * model->max_k);
  uint16_t *head_out = (uint16_t *)next; /* [m, head.n] */

  for (int64_t t = 0; t < m; t++) memcpy(x + t * hidden, model->embedding + ids[t] * hidden, 2 * hidden);
  for (int64_t i = 0; i < model->num_layers; i++) {
    const struct layer *layer = &model->layers[i];
    fn->add_rms_norm(x, i ? delta : NULL, layer->input_norm, normed, m, hidden, model->eps, 1, threads);
    linear(fn, &layer->qkv, normed, qkv, m, gemm_scratch, threads);
    fn->rotary(qkv, m, qkv_width, heads + kv_heads, dim, cos, sin, 1, threads);
    const uint16_t *k = qkv + heads * dim, *v = k + kv_heads * dim;
    fn->write_kv(k, qkv_width, v, qkv_width, slots, m, layer->k_cache, layer->v_cache, kv_heads, dim, 1);
    fn->decode_attention(qkv, qkv_width, layer->k_cache, layer->v_cache, tokens, tables, max_blocks, seq_lens, m,
                         attn, model->block_size, heads, kv_heads, dim, model->scale, 1, threads);
    linear(fn, &layer->o, attn, h, m, gemm_scratch, threads);
    fn->add_rms_norm(x, h, layer->post_norm, normed, m, hidden, model->eps, 1, threads);
    linear(fn, &layer->gate_up, normed, gate_up, m, gemm_scratch, threads);
    fn->silu_mul(gate_up, act, m, model->inter, 1, threads);
    linear(fn, &layer->down, act, delta, m, gemm_scratch, threads);
  }
  if (model->head.weight == NULL) {
    fn->add_rms_norm(x, delta, model->final_norm, normed_out, m, hidden, model->eps, 1, threads);
    return 0;
  }
  fn->add_rms_norm(x, delta, model->final_norm, normed, m, hidden, model->eps, 1, threads);
  linear(fn, &model->head, normed, head_out, m, gemm_scratch, threads);
  for (int64_t t = 0; t < m; t++)
    for (int64_t j = 0; j < model->vocab; j++) {
      uint32_t u = (uint32_t)head_out[t * model->head.n + j] << 16;
      memcpy(logits + t * model->vocab + j, &u, 4);
    }
  return 0;
}
