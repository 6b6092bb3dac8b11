/* The LoRA delta of one linear layer for a batch whose tokens use different adapters, for CPUs with AVX-512:

     y[t, rows of part p] += B[s, p] @ (A[s, p] @ x[t])   for every token t whose slot s = slots[t] >= 0

   Only a token's own slot is computed, base tokens (slot -1) are skipped, and a fused layer's parts
   (q/k/v, gate/up) each multiply only their own output rows: no one-hot mask, no block-diagonal zeros.
   The stacks are held transposed, so that a vector runs along the rank in the first product and along the
   output rows in the second:

     a [slots, parts, in, rank]  A^T of each slot's parts
     b [slots, rank, out]        B^T of each slot, each output row holding its own part's rank columns

   Tokens are grouped by slot (a counting sort), so a slot's A and B are read once per tile of up to MR of
   its tokens, not once per token. Three phases, each an OpenMP loop over independent items on torch's
   threads (the library links libgomp.so.1, which resolves to the copy torch has loaded):

     1. h = A x per (tile, part, chunk of KCHUNK inputs): partial sums, each chunk's A (16 KiB at rank 16)
        read from L1 by the tile after the first;
     2. the chunks' partial sums added in chunk order, per (token, part);
     3. y += B^T h per (block of up to 64 output rows within a part, tile), sums over the rank in order.

   Every sum runs in an order fixed by the shapes alone (input k within a chunk, chunks in order, rank r
   in order; each token's own accumulators), so a token's delta is the same bits whatever tokens share
   its batch, tile or thread. float32 and bfloat16 (converted to float32 on load, sums in float32, the
   result rounded to nearest even as torch rounds). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 6        /* tokens per tile: in phase 3, MR x 4 accumulators + 4 of B + 1 broadcast <= 32 zmm */
#define KCHUNK 256  /* inputs per phase-1 item */
#define BLOCK 64    /* output rows per phase-3 item */

/* 16 (or `mask`'s) consecutive values as float32; bf16 = 1: bfloat16 in memory */
static inline __attribute__((always_inline)) __m512 load16(const void *p, __mmask16 mask, const int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, p);
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) float load1(const void *p, int64_t i, const int bf16) {
  if (!bf16) return ((const float *)p)[i];
  uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* y[0..15] (or `mask`'s) += v, in y's type: bfloat16 rounded to nearest even, NaN to 0x7fc0 (as torch) */
static inline __attribute__((always_inline)) void add16(void *y, __m512 v, __mmask16 mask, const int bf16) {
  __m512 sum = _mm512_add_ps(load16(y, mask, bf16), v);
  if (!bf16) {
    _mm512_mask_storeu_ps(y, mask, sum);
    return;
  }
  __m512i u = _mm512_castps_si512(sum);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(sum, sum, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(y, mask, _mm512_cvtepi32_epi16(u));
}

static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* phase 1: h[i][0..15] = sum over k in [k0, k1) of x[token i][k] * at[k][0..15] (at: one rank vector of
   A^T, rows `rank` apart); two chains per token (even and odd k) added at the end, whatever `rows` is */
static inline __attribute__((always_inline)) void project(const void *x, int64_t ldx, const int64_t *tokens,
                                                          const void *at, int64_t rank, __mmask16 mask,
                                                          int64_t k0, int64_t k1, float *h, int64_t ldh,
                                                          const int rows, const int bf16) {
  __m512 even[MR], odd[MR];
  int64_t row[MR];
  for (int i = 0; i < rows; i++) {
    even[i] = odd[i] = _mm512_setzero_ps();
    row[i] = tokens[i] * ldx;
  }
  const int size = bf16 ? 2 : 4;
  const char *base = (const char *)at;
  int64_t k = k0;
  for (; k + 1 < k1; k += 2) {
    __m512 a0 = load16(base + k * rank * size, mask, bf16), a1 = load16(base + (k + 1) * rank * size, mask, bf16);
    for (int i = 0; i < rows; i++) {
      even[i] = _mm512_fmadd_ps(_mm512_set1_ps(load1(x, row[i] + k, bf16)), a0, even[i]);
      odd[i] = _mm512_fmadd_ps(_mm512_set1_ps(load1(x, row[i] + k + 1, bf16)), a1, odd[i]);
    }
  }
  if (k < k1) {
    __m512 a0 = load16(base + k * rank * size, mask, bf16);
    for (int i = 0; i < rows; i++)
      even[i] = _mm512_fmadd_ps(_mm512_set1_ps(load1(x, row[i] + k, bf16)), a0, even[i]);
  }
  for (int i = 0; i < rows; i++) _mm512_storeu_ps(h + i * ldh, _mm512_add_ps(even[i], odd[i]));
}

/* phase 3: y[token i][c0 + 16v ..] += sum over r of h[i][r] * bt[r][16v ..], for nv vectors (the last `mask`) */
static inline __attribute__((always_inline)) void expand(void *y, int64_t ldy, const int64_t *tokens,
                                                         const float *h, int64_t ldh, const void *bt, int64_t out,
                                                         int64_t rank, __mmask16 mask, const int rows,
                                                         const int nv, const int bf16) {
  __m512 sum[MR][4];
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++) sum[i][v] = _mm512_setzero_ps();
  const int size = bf16 ? 2 : 4;
  for (int64_t r = 0; r < rank; r++) {
    __m512 b[4];
    for (int v = 0; v < nv; v++)
      b[v] = load16((const char *)bt + (r * out + v * 16) * size, v == nv - 1 ? mask : 0xffff, bf16);
    for (int i = 0; i < rows; i++) {
      __m512 hr = _mm512_set1_ps(h[i * ldh + r]);
      for (int v = 0; v < nv; v++) sum[i][v] = _mm512_fmadd_ps(hr, b[v], sum[i][v]);
    }
  }
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++)
      add16((char *)y + (tokens[i] * ldy + v * 16) * size, sum[i][v], v == nv - 1 ? mask : 0xffff, bf16);
}

#define PROJECT(R) project(x, ldx, tokens, at, rank, mask, k0, k1, h, ldh, R, bf16)
#define EXPAND(R, NV) expand(yb, ldy, tokens, h, ldh, bt, out, rank, mask, R, NV, bf16)
#define EXPAND_ROWS(NV)         \
  switch (rows) {               \
    case 1: EXPAND(1, NV); break; \
    case 2: EXPAND(2, NV); break; \
    case 3: EXPAND(3, NV); break; \
    case 4: EXPAND(4, NV); break; \
    case 5: EXPAND(5, NV); break; \
    default: EXPAND(6, NV); break; \
  }

static inline __attribute__((always_inline)) void delta(const void *x, int64_t ldx, void *y, int64_t ldy,
                                                        const int64_t *slots, int64_t n, const void *a,
                                                        const void *b, const int64_t *part_rows, int64_t parts,
                                                        int64_t in, int64_t out, int64_t rank, int64_t num_slots,
                                                        int threads, const int bf16) {
  const int size = bf16 ? 2 : 4;
  /* tokens grouped by slot: order[start[s] .. start[s + 1]) are slot s's, in batch order */
  int64_t *start = calloc(num_slots + 1, sizeof *start), *order = malloc((n + 1) * sizeof *order);
  for (int64_t t = 0; t < n; t++)
    if (slots[t] >= 0 && slots[t] < num_slots) start[slots[t] + 1]++;  /* anything else is the base */
  for (int64_t s = 0; s < num_slots; s++) start[s + 1] += start[s];
  int64_t active = start[num_slots];
  int64_t *next = malloc((num_slots + 1) * sizeof *next);
  memcpy(next, start, (num_slots + 1) * sizeof *next);
  for (int64_t t = 0; t < n; t++)
    if (slots[t] >= 0 && slots[t] < num_slots) order[next[slots[t]]++] = t;
  free(next);
  if (active == 0) {
    free(order), free(start);
    return;
  }
  /* tiles: up to MR tokens of one slot, from position tile_start[i] */
  int64_t tiles = 0;
  for (int64_t s = 0; s < num_slots; s++) tiles += (start[s + 1] - start[s] + MR - 1) / MR;
  int64_t *tile_start = malloc((tiles + 1) * sizeof *tile_start), *tile_slot = malloc((tiles + 1) * sizeof *tile_slot);
  tiles = 0;
  for (int64_t s = 0; s < num_slots; s++)
    for (int64_t p = start[s]; p < start[s + 1]; p += MR) tile_start[tiles] = p, tile_slot[tiles++] = s;
  /* output blocks: up to BLOCK rows of one part */
  int64_t blocks = 0;
  for (int64_t p = 0; p < parts; p++) blocks += (part_rows[2 * p + 1] + BLOCK - 1) / BLOCK;
  int64_t *block_part = malloc((blocks + 1) * sizeof *block_part), *block_row = malloc((blocks + 1) * sizeof *block_row);
  blocks = 0;
  for (int64_t p = 0; p < parts; p++)
    for (int64_t r = 0; r < part_rows[2 * p + 1]; r += BLOCK) block_part[blocks] = p, block_row[blocks++] = r;
  /* partial sums: position j's part p, chunk c at h + ((j * parts + p) * chunks + c) * width */
  const int64_t chunks = (in + KCHUNK - 1) / KCHUNK, vectors = (rank + 15) / 16, width = vectors * 16;
  float *partial = malloc((active * parts * chunks * width + 1) * sizeof *partial);
  const int64_t ldh = parts * chunks * width;  /* from one position to the next */

#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < tiles * parts * chunks * vectors; item++) {
      int64_t v = item % vectors, c = item / vectors % chunks, p = item / vectors / chunks % parts,
              i = item / vectors / chunks / parts;
      int64_t first = tile_start[i], s = tile_slot[i];
      int rows = (int)(start[s + 1] - first < MR ? start[s + 1] - first : MR);
      const int64_t *tokens = order + first;
      const void *at = (const char *)a + (((s * parts + p) * in) * rank + v * 16) * size;
      __mmask16 mask = lanes(rank - v * 16);
      int64_t k0 = c * KCHUNK, k1 = k0 + KCHUNK < in ? k0 + KCHUNK : in;
      float *h = partial + ((first * parts + p) * chunks + c) * width + v * 16;
      switch (rows) {
        case 1: PROJECT(1); break;
        case 2: PROJECT(2); break;
        case 3: PROJECT(3); break;
        case 4: PROJECT(4); break;
        case 5: PROJECT(5); break;
        default: PROJECT(6); break;
      }
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < active * parts; item++) {
      float *h = partial + item * chunks * width;
      for (int64_t c = 1; c < chunks; c++)
        for (int64_t v = 0; v < vectors; v++)
          _mm512_storeu_ps(h + v * 16, _mm512_add_ps(_mm512_loadu_ps(h + v * 16),
                                                     _mm512_loadu_ps(h + c * width + v * 16)));
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < blocks * tiles; item++) {
      int64_t i = item % tiles, j = item / tiles, p = block_part[j];
      int64_t first = tile_start[i], s = tile_slot[i];
      int rows = (int)(start[s + 1] - first < MR ? start[s + 1] - first : MR);
      const int64_t *tokens = order + first;
      int64_t row = part_rows[2 * p] + block_row[j], left = part_rows[2 * p + 1] - block_row[j];
      int nv = (int)((left < BLOCK ? left : BLOCK) + 15) / 16;
      __mmask16 mask = lanes(left - (nv - 1) * 16);
      const void *bt = (const char *)b + (s * rank * out + row) * size;
      const float *h = partial + (first * parts + p) * chunks * width;
      void *yb = (char *)y + row * size;
      switch (nv) {
        case 4: EXPAND_ROWS(4) break;
        case 3: EXPAND_ROWS(3) break;
        case 2: EXPAND_ROWS(2) break;
        default: EXPAND_ROWS(1) break;
      }
    }
  }
  free(partial), free(block_row), free(block_part), free(tile_slot), free(tile_start), free(order),
      free(start);
}

/* x [n', in] (row stride ldx), y [n', out] (row stride ldy) for n' >= n; slots [n]: each token's slot, -1 (or
   any value outside 0 .. num_slots - 1) the base model; part_rows [parts][2]: each part's first output row
   and row count */
void lora_delta_f32(const float *x, int64_t ldx, float *y, int64_t ldy, const int64_t *slots, int64_t n,
                    const float *a, const float *b, const int64_t *part_rows, int64_t parts, int64_t in,
                    int64_t out, int64_t rank, int64_t num_slots, int threads) {
  delta(x, ldx, y, ldy, slots, n, a, b, part_rows, parts, in, out, rank, num_slots, threads, 0);
}

void lora_delta_bf16(const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy, const int64_t *slots, int64_t n,
                     const uint16_t *a, const uint16_t *b, const int64_t *part_rows, int64_t parts, int64_t in,
                     int64_t out, int64_t rank, int64_t num_slots, int threads) {
  delta(x, ldx, y, ldy, slots, n, a, b, part_rows, parts, in, out, rank, num_slots, threads, 1);
}
