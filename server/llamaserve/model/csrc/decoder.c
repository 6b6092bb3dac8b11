/* A decode-only step in one call, through the other kernels of this directory: the embedding rows, every
   decoder layer, the final norm and the LM head.

   A batch-1 decode step of a small model is some 300 kernel calls (four matmuls, two norms, rotary, the cache
   write and attention per layer), each a few microseconds of work; made one by one from Python, each also
   costs its dispatch (wrapping tensors, allocating outputs, ctypes), and those costs added up to as much
   again as the kernels. Here the step runs the same kernels on the same buffers a layer at a time, so its
   logits are bit-identical to the layer-by-layer path's; only the calls are made from C. The kernels come as
   function pointers from their own libraries (model/cpu_kernels.py passes their addresses): each stays in its
   own file, built with its own flags.

   The threads run the whole step as one team (one OpenMP region, not one per kernel: with OMP_WAIT_POLICY=
   PASSIVE each region's start cost a wake-up, and the batch-1 step took three times as long). The norms,
   rotary, cache writes and SiLU split the rows among them; a matmul's 64-column blocks and attention's
   (sequence, KV head) items go out from a counter, in runs that shrink as they run out (guided), so a thread
   held up by the rows, or by a neighbour's process, takes fewer. Between two kernels where the second reads
   what the first wrote, the team meets at a barrier. (At batch 1 one thread has the one row: the other waits
   ~0.4 ms a step, mostly for its norms and SiLU and for the last block of each matmul.)

   bfloat16 activations throughout; every linear projection is llamaserve's bf16, int8 or int4 kernel, and so
   is the LM head where it runs on one (else the step ends at the final norm, and the caller projects). */

#include <immintrin.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { BF16 = 0, INT8 = 1, INT4 = 2 };
enum { BLOCK = 64 };   /* output columns per block, in every matmul kernel's layout */
enum { SPINS = 1 << 14 }; /* pauses a waiting thread spins through before yielding its core */

typedef void (*gemm_bf16_fn)(const uint16_t *x, int64_t ldx, const uint16_t *packed, uint16_t *y, int64_t ldy,
                             int64_t m, int64_t n, int64_t k, int64_t b0, int64_t b1);
typedef void (*int8_prepare_fn)(const uint16_t *x, int64_t ldx, void *scratch, int64_t m, int64_t k, int64_t r0,
                                int64_t r1);
typedef void (*gemm_int8_fn)(const int8_t *codes, const float *scales, uint16_t *y, int64_t ldy,
                             const void *scratch, int64_t m, int64_t n, int64_t k, int64_t b0, int64_t b1);
typedef void (*int4_prepare_fn)(const uint16_t *x, int64_t ldx, float *xsum, int64_t k, int64_t group, int64_t r0,
                                int64_t r1);
typedef void (*gemm_int4_fn)(const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *params,
                             uint16_t *y, int64_t ldy, const float *xsum, int64_t m, int64_t n, int64_t k,
                             int64_t group, int64_t b0, int64_t b1);
typedef void (*write_kv_fn)(const void *k, int64_t k_stride, const void *v, int64_t v_stride, const int64_t *slots,
                            int64_t tokens, void *k_cache, void *v_cache, int64_t num_kv_heads, int64_t head_dim,
                            int bf16);
typedef void (*attention_item_fn)(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                                  const int64_t *tokens, const int64_t *block_tables, int64_t max_blocks,
                                  const int64_t *seq_lens, void *out, int64_t block_size, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, float scale, int bf16, int64_t item);
typedef void (*add_rms_norm_fn)(void *residual, const void *delta, const void *weight, void *out, int64_t rows,
                                int64_t hidden, float eps, int bf16, int threads);
typedef void (*silu_mul_fn)(const void *gate_up, void *out, int64_t rows, int64_t inter, int bf16, int threads);
typedef void (*rotary_fn)(void *x, int64_t tokens, int64_t stride, int64_t rotated, int64_t head_dim,
                          const void *cos, const void *sin, int bf16, int threads);

struct kernels { /* addresses of the functions of gemm_*.c, attention.c and layer_ops.c (NULL: not built) */
  gemm_bf16_fn gemm_bf16;
  int8_prepare_fn int8_prepare;
  gemm_int8_fn gemm_int8;
  int4_prepare_fn int4_prepare;
  gemm_int4_fn gemm_int4;
  write_kv_fn write_kv;
  attention_item_fn attention_item;
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
  const uint16_t *embedding;  /* [vocab, hidden] */
  int64_t vocab;              /* the embedding's rows and the logits' columns */
  const uint16_t *final_norm; /* [hidden] */
  struct linear head;         /* [vocab (or more), hidden]; weight NULL: the caller's to apply */
};

struct team {                /* the threads of one step */
  int threads;
  atomic_int arrived;        /* at the barrier of this phase */
  atomic_llong phase;        /* barriers passed */
};

/* [*begin, *end): thread t's share of count things among `threads` */
static inline void share(int64_t count, int t, int threads, int64_t *begin, int64_t *end) {
  *begin = count * t / threads;
  *end = count * (t + 1) / threads;
}

/* The next run of the count things `taken` hands out, [*begin, *begin + returned): a share of what is left,
   shrinking to 1; 0 once all are taken. */
static int64_t grab(atomic_llong *taken, int64_t count, int threads, int64_t *begin) {
  long long at = atomic_load_explicit(taken, memory_order_relaxed);
  for (;;) {
    if (at >= count) return 0;
    int64_t run = (count - at) / (2 * threads);
    run = run < 1 ? 1 : run;
    if (atomic_compare_exchange_weak_explicit(taken, &at, at + run, memory_order_relaxed, memory_order_relaxed)) {
      *begin = at;
      return run;
    }
  }
}

/* The team's barrier: returns once every thread has called it. Waiting, a thread spins, then yields its core
   (another process's threads may need it). */
static void meet(struct team *team) {
  const long long phase = atomic_load_explicit(&team->phase, memory_order_acquire);
  if (atomic_fetch_add(&team->arrived, 1) == team->threads - 1) {
    atomic_store_explicit(&team->arrived, 0, memory_order_relaxed);
    atomic_store_explicit(&team->phase, phase + 1, memory_order_release);
    return;
  }
  for (int64_t spins = 0; atomic_load_explicit(&team->phase, memory_order_acquire) == phase; spins++)
    if (spins < SPINS) _mm_pause();
    else sched_yield();
}

/* Thread t's part of y [m, l->n] = x [m, l->k] @ W^T: for int8 and int4, its rows of x prepared for the kernel
   into scratch and a barrier; then blocks from `taken` until none are left. */
static void linear(const struct kernels *fn, const struct linear *l, const uint16_t *x, uint16_t *y, int64_t m,
                   void *scratch, atomic_llong *taken, int t, struct team *team) {
  int64_t r0, r1, b0, run;
  share(m, t, team->threads, &r0, &r1);
  if (l->kind == INT8) fn->int8_prepare(x, l->k, scratch, m, l->k, r0, r1);
  if (l->kind == INT4) fn->int4_prepare(x, l->k, scratch, l->k, l->group, r0, r1);
  if (l->kind != BF16) meet(team);
  while ((run = grab(taken, (l->n + BLOCK - 1) / BLOCK, team->threads, &b0)))
    switch (l->kind) {
      case BF16: fn->gemm_bf16(x, l->k, l->weight, y, l->n, m, l->n, l->k, b0, b0 + run); break;
      case INT8: fn->gemm_int8(l->weight, l->params, y, l->n, scratch, m, l->n, l->k, b0, b0 + run); break;
      default: fn->gemm_int4(x, l->k, l->weight, l->params, y, l->n, scratch, m, l->n, l->k, l->group, b0, b0 + run);
    }
}

static size_t aligned(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Bytes of scratch decode_step needs for m tokens. */
size_t decoder_scratch_bytes(const struct model *model, int64_t m) {
  const int64_t qkv = (model->heads + 2 * model->kv_heads) * model->head_dim;
  return aligned(2 * m * model->hidden) * 4 + aligned(2 * m * qkv) + aligned(2 * m * model->heads * model->head_dim) +
         aligned(2 * m * 2 * model->inter) + aligned(2 * m * model->inter) + aligned(4 * m * model->max_k) +
         aligned(2 * m * model->head.n) + aligned(sizeof(atomic_llong) * (5 * model->num_layers + 1));
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
  const int64_t qkv_width = (heads + 2 * kv_heads) * dim, inter = model->inter, layers = model->num_layers;
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
  next += aligned(2 * m * 2 * inter);
  uint16_t *act = (uint16_t *)next;
  next += aligned(2 * m * inter);
  void *prepared = next; /* x as an int8 or int4 matmul takes it */
  next += aligned(4 * m * model->max_k);
  uint16_t *head_out = (uint16_t *)next; /* [m, head.n] */
  next += aligned(2 * m * model->head.n);
  /* what each layer's qkv, attention, o, gate_up and down (5 i + 0..4), then the head, have handed out */
  atomic_llong *taken = (atomic_llong *)next;
  for (int64_t i = 0; i < 5 * layers + 1; i++) atomic_init(&taken[i], 0);
  struct team team = {.threads = 1};
  atomic_init(&team.arrived, 0);
  atomic_init(&team.phase, 0);

#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    team.threads = omp_get_num_threads();
    const int t = omp_get_thread_num();
    int64_t r0, r1; /* this thread's rows of the small steps */
    share(m, t, team.threads, &r0, &r1);
    const int64_t rows = r1 - r0;
    for (int64_t r = r0; r < r1; r++) memcpy(x + r * hidden, model->embedding + ids[r] * hidden, 2 * hidden);
    for (int64_t i = 0; i < layers; i++) {
      const struct layer *layer = &model->layers[i];
      atomic_llong *handed = taken + 5 * i;
      fn->add_rms_norm(x + r0 * hidden, i ? delta + r0 * hidden : NULL, layer->input_norm, normed + r0 * hidden, rows,
                       hidden, model->eps, 1, 1);
      meet(&team);
      linear(fn, &layer->qkv, normed, qkv, m, prepared, &handed[0], t, &team);
      meet(&team);
      fn->rotary(qkv + r0 * qkv_width, rows, qkv_width, heads + kv_heads, dim, cos + r0 * dim, sin + r0 * dim, 1, 1);
      const uint16_t *k = qkv + r0 * qkv_width + heads * dim, *v = k + kv_heads * dim;
      fn->write_kv(k, qkv_width, v, qkv_width, slots + r0, rows, layer->k_cache, layer->v_cache, kv_heads, dim, 1);
      meet(&team);
      for (int64_t item, run; (run = grab(&handed[1], m * kv_heads, team.threads, &item));)
        for (int64_t end = item + run; item < end; item++)
          fn->attention_item(qkv, qkv_width, layer->k_cache, layer->v_cache, tokens, tables, max_blocks, seq_lens,
                             attn, model->block_size, heads, kv_heads, dim, model->scale, 1, item);
      meet(&team);
      linear(fn, &layer->o, attn, h, m, prepared, &handed[2], t, &team);
      meet(&team);
      fn->add_rms_norm(x + r0 * hidden, h + r0 * hidden, layer->post_norm, normed + r0 * hidden, rows, hidden,
                       model->eps, 1, 1);
      meet(&team);
      linear(fn, &layer->gate_up, normed, gate_up, m, prepared, &handed[3], t, &team);
      meet(&team);
      fn->silu_mul(gate_up + r0 * 2 * inter, act + r0 * inter, rows, inter, 1, 1);
      meet(&team);
      linear(fn, &layer->down, act, delta, m, prepared, &handed[4], t, &team);
      meet(&team);
    }
    uint16_t *final = model->head.weight == NULL ? normed_out : normed;
    fn->add_rms_norm(x + r0 * hidden, delta + r0 * hidden, model->final_norm, final + r0 * hidden, rows, hidden,
                     model->eps, 1, 1);
    if (model->head.weight != NULL) {
      meet(&team);
      linear(fn, &model->head, normed, head_out, m, prepared, &taken[5 * layers], t, &team);
      meet(&team);
      int64_t c0, c1; /* this thread's columns of the logits, as float32 */
      share(model->vocab, t, team.threads, &c0, &c1);
      for (int64_t r = 0; r < m; r++)
        for (int64_t j = c0; j < c1; j++) {
          uint32_t u = (uint32_t)head_out[r * model->head.n + j] << 16;
          memcpy(logits + r * model->vocab + j, &u, 4);
        }
    }
  }
  return 0;
}
