/* Paged attention for decode tokens on CPU (one new token per sequence) and the step's K/V cache writes,
   float32 or bfloat16, AVX-512. The torch backend's decode path spends more on a dozen small operators per
   layer (views, gathers, index copies, the flash kernel's setup) than on the arithmetic, which for one
   query token is a few hundred thousand multiply-adds: here it is one call per layer.

   Layouts (those of model/attention.py): a cache is [num_blocks, block_size, num_kv_heads, head_dim],
   contiguous; q rows [tokens, num_heads, head_dim] and k/v rows [tokens, num_kv_heads, head_dim], each with
   its own token stride (views into the fused QKV projection); out [tokens, num_heads * head_dim].
   Query head h attends with KV head h / (num_heads / num_kv_heads) (grouped-query attention).

   Each (sequence, KV head) is one work item, run by one thread: the query heads of that KV head over the
   context in chunks of CHUNK tokens, with an online softmax (a running max and sum per query head, the
   accumulators rescaled when the max grows), so that a fixed stack buffer serves any context length. Per
   chunk, in tiles of 16 tokens:
   - scores: a query head's 16 dot products accumulate as 16 vectors, reduced together by a transpose-and-add
     tree (45 instructions for 16 scores; a horizontal sum costs about 10 for one); bfloat16 multiplies
     pairs of dims (vdpbf16ps) straight from the cache, without widening K;
   - probabilities: 16 exps at once (exp16), kept in float32;
   - values: the accumulators of every query head for up to 64 dims stay in registers over the tile, so each
     V row is loaded and widened once for all of them.
   K rows are prefetched into L2 two tiles ahead, V rows a pass ahead (prefetch_rows). A tile past the
   context's end repeats its last token's row with probability 0. A sequence's result depends on nothing
   else in the call, nor on the thread count: each query head's arithmetic is the same whatever the batch. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vectors.h"

enum { MAX_GROUP = 8, MAX_HEAD_DIM = 256, CHUNK = 256 }; /* MAX_*: cpu_kernels.PagedAttention's */

/* k/v rows of `tokens` tokens into their cache slots (slot = block * block_size + offset) */
void write_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, const int64_t *slots,
              int64_t tokens, void *k_cache, void *v_cache, int64_t num_kv_heads, int64_t head_dim, int bf16) {
  int64_t row = num_kv_heads * head_dim;
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t i = 0; i < row; i += 16) {
      store16(k_cache, slots[t] * row + i, load16(k, t * k_stride + i, bf16), bf16);
      store16(v_cache, slots[t] * row + i, load16(v, t * v_stride + i, bf16), bf16);
    }
}

/* Lane t of the result = the sum of v[t]'s 16 lanes. */
static inline __m512 sum16(const __m512 v[16]) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; i++) /* per 128-bit lane: v[2i] and v[2i+1]'s elements 0+2 and 1+3, interleaved */
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) { /* per 128-bit lane: tokens 4i..4i+3, each summed over that lane */
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; i++) /* 128-bit lanes 0+1 and 2+3 of quads[2i], then of quads[2i+1] */
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

/* The 16 dot products of q ([head_dim], scaled) with the K rows at byte offsets rows[0..15], float32 */
static inline __m512 scores_f32(const float *q, const char *k_cache, const int64_t *rows, int64_t head_dim) {
  __m512 acc[16];
  for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < head_dim; d += 16) {
    const __m512 qd = _mm512_loadu_ps(q + d);
    for (int t = 0; t < 16; t++)
      acc[t] = _mm512_fmadd_ps(qd, _mm512_loadu_ps((const float *)(k_cache + rows[t]) + d), acc[t]);
  }
  return sum16(acc);
}

/* The same in bfloat16, unscaled: 32 dims an instruction (the last 16 alone where head_dim % 32 == 16) */
static inline __m512 scores_bf16(const uint16_t *q, const char *k_cache, const int64_t *rows, int64_t head_dim) {
  __m512 acc[16];
  for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= head_dim; d += 32) {
    const __m512bh qd = (__m512bh)_mm512_loadu_si512(q + d);
    for (int t = 0; t < 16; t++)
      acc[t] = _mm512_dpbf16_ps(acc[t], qd, (__m512bh)_mm512_loadu_si512((const uint16_t *)(k_cache + rows[t]) + d));
  }
  if (d < head_dim) { /* 256-bit loads, the upper halves zero */
    const __m512bh qd = (__m512bh)_mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(q + d)));
    for (int t = 0; t < 16; t++)
      acc[t] = _mm512_dpbf16_ps(acc[t], qd, (__m512bh)_mm512_zextsi256_si512(_mm256_loadu_si256(
                                                (const __m256i *)((const uint16_t *)(k_cache + rows[t]) + d))));
  }
  return sum16(acc);
}

/* acc[j][c] += the sum over tokens t = first..first+15 of probs[j][t] * V[rows[t]][slice c] for the `wide`
   slices c = c0.. and `heads` query heads; both constants once inlined, so that the accumulators stay in
   registers and each V slice is loaded and widened once for every query head. Slices come in pairs (wide
   2 or 4) but for the last of an odd number: a pair's 32 bfloat16 values widen in two instructions, the
   even dims into slice c and the odd ones into slice c + 1 (interleaved again when stored). */
static inline __attribute__((always_inline)) void weigh_slices(__m512 acc[][MAX_HEAD_DIM / 16],
                                                               const float probs[][CHUNK], int64_t first,
                                                               const char *v_cache, const int64_t *rows, int64_t c0,
                                                               int bf16, const int heads, const int wide) {
  __m512 a[MAX_GROUP][4];
  for (int j = 0; j < heads; j++)
    for (int c = 0; c < wide; c++) a[j][c] = acc[j][c0 + c];
  for (int64_t t = first; t < first + 16; t++) {
    const char *row = v_cache + rows[t];
    for (int c = 0; c < wide; c += 2) {
      __m512 v[2];
      if (wide == 1) {
        v[0] = load16(row, c0 * 16, bf16);
      } else if (bf16) {
        const __m512i x = _mm512_loadu_si512((const uint16_t *)row + (c0 + c) * 16);
        v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        v[1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000)));
      } else {
        v[0] = _mm512_loadu_ps((const float *)row + (c0 + c) * 16);
        v[1] = _mm512_loadu_ps((const float *)row + (c0 + c + 1) * 16);
      }
      for (int i = 0; i < 2 && c + i < wide; i++)
        for (int j = 0; j < heads; j++)
          a[j][c + i] = _mm512_fmadd_ps(_mm512_set1_ps(probs[j][t]), v[i], a[j][c + i]);
    }
  }
  for (int j = 0; j < heads; j++)
    for (int c = 0; c < wide; c++) acc[j][c0 + c] = a[j][c];
}

static inline __attribute__((always_inline)) void weigh_tile(__m512 acc[][MAX_HEAD_DIM / 16],
                                                             const float probs[][CHUNK], int64_t first,
                                                             const char *v_cache, const int64_t *rows,
                                                             int64_t slices, int bf16, const int heads) {
  const int wide = heads <= 4 ? 4 : 2; /* at most 16 accumulators */
  int64_t c = 0;
  for (; c + wide <= slices; c += wide) weigh_slices(acc, probs, first, v_cache, rows, c, bf16, heads, wide);
  if (wide == 4 && c + 2 <= slices) {
    weigh_slices(acc, probs, first, v_cache, rows, c, bf16, heads, 2);
    c += 2;
  }
  if (c < slices) weigh_slices(acc, probs, first, v_cache, rows, c, bf16, heads, 1);
}

/* weigh_tile for the tokens first..first+15, built for each group size */
static void weigh_values(__m512 acc[][MAX_HEAD_DIM / 16], const float probs[][CHUNK], int64_t first,
                         const char *v_cache, const int64_t *rows, int64_t slices, int bf16, int heads) {
  switch (heads) {
    case 1: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 1); break;
    case 2: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 2); break;
    case 3: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 3); break;
    case 4: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 4); break;
    case 5: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 5); break;
    case 6: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 6); break;
    case 7: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 7); break;
    default: weigh_tile(acc, probs, first, v_cache, rows, slices, bf16, 8); break;
  }
}

/* Starts loading a head's `bytes` of the cache rows at byte offsets rows[0..15] into L2: the blocks are
   scattered and the rows strided, so the hardware prefetchers miss them. Into L2, not L1: on this project's
   Zen 4, prefetches into L1 queued on its few miss buffers and left cold caches 2.4x slower than these. */
static inline void prefetch_rows(const char *cache, const int64_t *rows, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64)
    for (int t = 0; t < 16; t++) _mm_prefetch(cache + rows[t] + b, _MM_HINT_T1);
}

/* Work item `item` of decode_attention (below): sequence item / num_kv_heads's query heads of KV head
   item % num_kv_heads. One thread. */
void decode_attention_item(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                           const int64_t *tokens, const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *seq_lens, void *out, int64_t block_size, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, float scale, int bf16, int64_t item) {
  const int64_t group = num_heads / num_kv_heads, slices = head_dim / 16, elem = bf16 ? 2 : 4;
  const int64_t row_bytes = num_kv_heads * head_dim * elem, head_bytes = head_dim * elem;
  const char *k = k_cache, *v = v_cache;
  const int64_t s = item / num_kv_heads, kvh = item % num_kv_heads, len = seq_lens[s];
  const int64_t *table = block_tables + s * max_blocks;
  const int64_t q_at = tokens[s] * q_stride + kvh * group * head_dim;
  const int64_t out_at = tokens[s] * num_heads * head_dim + kvh * group * head_dim;
  float q_scaled[MAX_GROUP][MAX_HEAD_DIM]; /* float32's queries times scale (bfloat16 scales the scores) */
  if (!bf16)
    for (int64_t j = 0; j < group; j++)
      for (int64_t d = 0; d < head_dim; d += 16)
        _mm512_storeu_ps(&q_scaled[j][d],
                         _mm512_mul_ps(load16(q, q_at + j * head_dim + d, 0), _mm512_set1_ps(scale)));
  float max[MAX_GROUP], probs[MAX_GROUP][CHUNK]; /* probs: the chunk's scores, then their exps */
  __m512 sum[MAX_GROUP], acc[MAX_GROUP][MAX_HEAD_DIM / 16];
  for (int64_t j = 0; j < group; j++) {
    max[j] = -INFINITY;
    sum[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < slices; c++) acc[j][c] = _mm512_setzero_ps();
  }
  for (int64_t start = 0; start < len; start += CHUNK) {
    const int64_t n = len - start < CHUNK ? len - start : CHUNK, tiles = (n + 15) / 16;
    int64_t rows[CHUNK]; /* each token's byte offset in the caches; past n, token len - 1's */
    for (int64_t t = 0; t < n;) { /* a block's tokens at a time */
      const int64_t offset = (start + t) % block_size, in_block = block_size - offset;
      const int64_t at = (table[(start + t) / block_size] * block_size + offset) * row_bytes + kvh * head_bytes;
      for (int64_t i = 0, end = t + in_block < n ? t + in_block : n; t < end; t++, i++) rows[t] = at + i * row_bytes;
    }
    for (int64_t t = n; t < tiles * 16; t++) rows[t] = rows[n - 1];
    for (int64_t i = 0; i < 2 && i < tiles; i++) prefetch_rows(k, rows + 16 * i, head_bytes);
    __m512 chunk_max[MAX_GROUP];
    for (int64_t j = 0; j < group; j++) chunk_max[j] = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < tiles; i++) {
      if (i + 2 < tiles) prefetch_rows(k, rows + 16 * (i + 2), head_bytes);
      prefetch_rows(v, rows + 16 * i, head_bytes); /* for the values' pass after this one */
      const __mmask16 valid = n - 16 * i >= 16 ? 0xffff : (1u << (n - 16 * i)) - 1;
      for (int64_t j = 0; j < group; j++) {
        __m512 score = bf16 ? _mm512_mul_ps(scores_bf16((const uint16_t *)q + q_at + j * head_dim, k,
                                                        rows + 16 * i, head_dim),
                                            _mm512_set1_ps(scale))
                            : scores_f32(q_scaled[j], k, rows + 16 * i, head_dim);
        score = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, score);
        _mm512_storeu_ps(&probs[j][16 * i], score);
        chunk_max[j] = _mm512_max_ps(chunk_max[j], score);
      }
    }
    for (int64_t j = 0; j < group; j++) {
      const float top = _mm512_reduce_max_ps(chunk_max[j]);
      if (top > max[j]) { /* what was summed so far, scaled by e^(old max - new max) */
        const __m512 rescale = exp16(_mm512_set1_ps(max[j] - top));
        sum[j] = _mm512_mul_ps(sum[j], rescale);
        for (int64_t c = 0; c < slices; c++) acc[j][c] = _mm512_mul_ps(acc[j][c], rescale);
        max[j] = top;
      }
      for (int64_t i = 0; i < tiles; i++) {
        const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(&probs[j][16 * i]), _mm512_set1_ps(max[j])));
        _mm512_storeu_ps(&probs[j][16 * i], p);
        sum[j] = _mm512_add_ps(sum[j], p);
      }
    }
    for (int64_t i = 0; i < tiles; i++) weigh_values(acc, probs, 16 * i, v, rows, slices, bf16, (int)group);
  }
  const __m512i evens = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(8));
  for (int64_t j = 0; j < group; j++) {
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[j]));
    for (int64_t c = 0; c < slices; c++) {
      __m512 x = acc[j][c];
      if (bf16 && c < (slices & ~1)) /* a pair's even and odd dims (weigh_slices) */
        x = _mm512_permutex2var_ps(acc[j][c & ~1], c & 1 ? odds : evens, acc[j][c | 1]);
      store16(out, out_at + j * head_dim + c * 16, _mm512_mul_ps(x, inv), bf16);
    }
  }
}

/* out[tokens[s]] = attention of sequence s's one query token over its seq_lens[s] cached tokens, for the
   num_seqs sequences, num_seqs * num_kv_heads work items shared among `threads` */
void decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                      const int64_t *tokens, const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens,
                      int64_t num_seqs, void *out, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, float scale, int bf16, int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < num_seqs * num_kv_heads; item++)
    decode_attention_item(q, q_stride, k_cache, v_cache, tokens, block_tables, max_blocks, seq_lens, out, block_size,
                          num_heads, num_kv_heads, head_dim, scale, bf16, item);
}
