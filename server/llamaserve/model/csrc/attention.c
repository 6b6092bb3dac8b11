/* Paged attention for decode tokens on CPU (one new token per sequence) and the step's K/V cache writes,
   float32 or bfloat16, AVX-512. The torch backend's decode path spends more on a dozen small operators per
   layer (views, gathers, index copies, the flash kernel's setup) than on the arithmetic, which for one
   query token is a few hundred thousand multiply-adds: here it is one call per layer.

   Layouts (those of model/attention.py): a cache is [num_blocks, block_size, num_kv_heads, head_dim],
   contiguous; q rows [tokens, num_heads, head_dim] and k/v rows [tokens, num_kv_heads, head_dim], each with
   its own token stride (views into the fused QKV projection); out [tokens, num_heads * head_dim].
   Query head h attends with KV head h / (num_heads / num_kv_heads) (grouped-query attention).

   Each (sequence, KV head) is one work item: scores of its query heads over the whole context, an exact
   softmax (max, exp, sum in float32), then the weighted sum of V; nothing depends on the other sequences. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m512 load16(const void *p, int64_t i, int bf16) {
  if (bf16)
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
  return _mm512_loadu_ps((const float *)p + i);
}

static inline void store16(void *p, int64_t i, __m512 v, int bf16) {
  if (bf16)
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh(v));
  else
    _mm512_storeu_ps((float *)p + i, v);
}

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

/* out[tokens[s]] = attention of sequence s's one query token over its seq_lens[s] cached tokens */
void decode_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                      const int64_t *tokens, const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens,
                      int64_t num_seqs, void *out, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, float scale, int bf16, int threads) {
  const int64_t group = num_heads / num_kv_heads, row = num_kv_heads * head_dim, chunks = head_dim / 16;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < num_seqs * num_kv_heads; item++) {
    const int64_t s = item / num_kv_heads, kvh = item % num_kv_heads, len = seq_lens[s], token = tokens[s];
    const int64_t *table = block_tables + s * max_blocks;
    float *scores = malloc(sizeof(float) * group * len);
    __m512 qv[8][16]; /* up to 8 query heads per KV head, head_dim up to 256 */
    for (int64_t j = 0; j < group; j++)
      for (int64_t c = 0; c < chunks; c++)
        qv[j][c] = _mm512_mul_ps(load16(q, token * q_stride + (kvh * group + j) * head_dim + c * 16, bf16),
                                 _mm512_set1_ps(scale));
    float max[8];
    for (int64_t j = 0; j < group; j++) max[j] = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
      int64_t base = (table[t / block_size] * block_size + t % block_size) * row + kvh * head_dim;
      __m512 kc[16];
      for (int64_t c = 0; c < chunks; c++) kc[c] = load16(k_cache, base + c * 16, bf16);
      for (int64_t j = 0; j < group; j++) {
        __m512 dot = _mm512_mul_ps(qv[j][0], kc[0]);
        for (int64_t c = 1; c < chunks; c++) dot = _mm512_fmadd_ps(qv[j][c], kc[c], dot);
        float score = _mm512_reduce_add_ps(dot);
        scores[j * len + t] = score;
        if (score > max[j]) max[j] = score;
      }
    }
    float sum[8];
    for (int64_t j = 0; j < group; j++) {
      sum[j] = 0;
      for (int64_t t = 0; t < len; t++) sum[j] += scores[j * len + t] = expf(scores[j * len + t] - max[j]);
    }
    __m512 acc[8][16];
    for (int64_t j = 0; j < group; j++)
      for (int64_t c = 0; c < chunks; c++) acc[j][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
      int64_t base = (table[t / block_size] * block_size + t % block_size) * row + kvh * head_dim;
      for (int64_t c = 0; c < chunks; c++) {
        __m512 vc = load16(v_cache, base + c * 16, bf16);
        for (int64_t j = 0; j < group; j++)
          acc[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j * len + t]), vc, acc[j][c]);
      }
    }
    for (int64_t j = 0; j < group; j++) {
      __m512 inv = _mm512_set1_ps(1.0f / sum[j]);
      for (int64_t c = 0; c < chunks; c++)
        store16(out, token * num_heads * head_dim + (kvh * group + j) * head_dim + c * 16,
                _mm512_mul_ps(acc[j][c], inv), bf16);
    }
    free(scores);
  }
}
