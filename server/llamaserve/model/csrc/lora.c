/* The LoRA delta of one linear layer for a batch whose tokens use different adapters, for CPUs with AVX-512:

     y[t, rows of part p] += B[s, p] @ (A[s, p] @ x[t])   for every token t whose slot s = slots[t] >= 0

   Only a token's own slot is computed, base tokens (slot -1) are skipped, and a fused layer's parts
   (q/k/v, gate/up) each multiply only their own output rows: no one-hot mask, no block-diagonal zeros.
   The stacks are held in this kernel's layout, the rank a multiple of 16 (one or more zmm):

     a [slots, parts, in, rank]   A^T of each slot's parts: a vector runs along the rank
     b [slots, rank * rows16]     B^T of each slot, part after part, each part's rows padded with zeros to
                                  rows16 (a multiple of 16) and cut into blocks of 64 (the last 16, 32 or
                                  48) rows: row c of block c0 of the part starting at `base` holds
                                  b[base + rank * c0 + r * width + c] for r < rank, so a block is one
                                  sequential run, as csrc/gemm_bf16.c packs a weight

   Tokens are grouped by slot (a counting sort), so a slot's A and B are read once per tile of up to MR of
   its tokens, not once per token. Two phases, each an OpenMP loop over independent items on torch's
   threads (the library links libgomp.so.1, which resolves to the copy torch has loaded), one barrier
   between them:

     1. h = A x per (tile, part, 16 of the rank);
     2. y += B^T h per (tile, block of b), starting from y.

   Every sum runs in an order fixed by the shapes alone (input k, in two chains of even and odd k, then
   rank r; each token's own accumulators), so a token's delta is the same bits whatever tokens share
   its batch, tile or thread. float32 and bfloat16 (converted to float32 on load, sums in float32, the
   result rounded to nearest even as torch rounds).

   The loops load whole vectors without masks: GCC keeps the accumulators in registers only then (a
   masked load in a loop may read anything, the accumulator array included, so it stores them every
   iteration). Masks are left to a part whose row count is not a multiple of 16 (tiny test models). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 6        /* tokens per tile: in phase 2, MR x 4 accumulators + 4 of B + 1 broadcast <= 32 zmm */
#define BLOCK 64    /* output rows per block of b */

/* 16 consecutive values as float32 (only `mask`'s lanes, unless it is 0xffff); bf16 = 1: bfloat16 */
static inline __attribute__((always_inline)) __m512 load16(const void *p, __mmask16 mask, const int bf16) {
  if (!bf16) return mask == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
  __m256i h = mask == 0xffff ? _mm256_loadu_si256(p) : _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* v to p[0..15] (`mask`'s lanes) in p's type: bfloat16 rounded to nearest even, NaN to 0x7fc0 (as torch) */
static inline __attribute__((always_inline)) void store16(void *p, __m512 v, __mmask16 mask, const int bf16) {
  if (!bf16) {
    if (mask == 0xffff)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, mask, v);
    return;
  }
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  if (mask == 0xffff)
    _mm256_storeu_si256(p, _mm512_cvtepi32_epi16(u));
  else
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(u));
}

static inline __attribute__((always_inline)) float load1(const void *p, int64_t i, const int bf16) {
  if (!bf16) return ((const float *)p)[i];
  uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* phase 1: h[i][0..15] = sum over k < in of x[token i][k] * at[k * rank + 0..15] (one rank vector of
   A^T); two chains per token (even and odd k), added at the end, whatever `rows` is */
static inline __attribute__((always_inline)) void project(const void *x, int64_t ldx, const int64_t *tokens,
                                                          const void *at, int64_t rank, int64_t in, float *h,
                                                          int64_t ldh, const int rows, const int bf16) {
  const int size = bf16 ? 2 : 4;
  const char *base = (const char *)at;
  __m512 even[MR], odd[MR];
  int64_t row[MR];
  for (int i = 0; i < rows; i++) {
    even[i] = odd[i] = _mm512_setzero_ps();
    row[i] = tokens[i] * ldx;
  }
  int64_t k = 0;
  for (; k + 1 < in; k += 2) {
    __m512 a0 = load16(base + k * rank * size, 0xffff, bf16), a1 = load16(base + (k + 1) * rank * size, 0xffff, bf16);
    for (int i = 0; i < rows; i++) {
      even[i] = _mm512_fmadd_ps(_mm512_set1_ps(load1(x, row[i] + k, bf16)), a0, even[i]);
      odd[i] = _mm512_fmadd_ps(_mm512_set1_ps(load1(x, row[i] + k + 1, bf16)), a1, odd[i]);
    }
  }
  if (k < in) {
    __m512 a0 = load16(base + k * rank * size, 0xffff, bf16);
    for (int i = 0; i < rows; i++)
      even[i] = _mm512_fmadd_ps(_mm512_set1_ps(load1(x, row[i] + k, bf16)), a0, even[i]);
  }
  for (int i = 0; i < rows; i++) _mm512_storeu_ps(h + i * ldh, _mm512_add_ps(even[i], odd[i]));
}

/* phase 2: y[token i][16v ..] += sum over r of h[i][r] * bt[r * width + 16v ..] for v < nv (width = 16 nv,
   one block of b), the sums starting from y; `mask`: the lanes of y's last vector (0xffff but at the end
   of a part whose rows are not a multiple of 16) */
static inline __attribute__((always_inline)) void expand(void *y, int64_t ldy, const int64_t *tokens,
                                                         const float *h, int64_t ldh, const void *bt, int64_t rank,
                                                         __mmask16 mask, const int rows, const int nv,
                                                         const int bf16) {
  const int size = bf16 ? 2 : 4, width = nv * 16;
  __m512 sum[MR][4];
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++)
      sum[i][v] = load16((char *)y + (tokens[i] * ldy + v * 16) * size, v == nv - 1 ? mask : 0xffff, bf16);
  for (int64_t r = 0; r < rank; r++) {
    __m512 b[4];
    for (int v = 0; v < nv; v++) b[v] = load16((const char *)bt + (r * width + v * 16) * size, 0xffff, bf16);
    for (int i = 0; i < rows; i++) {
      __m512 hr = _mm512_set1_ps(h[i * ldh + r]);
      for (int v = 0; v < nv; v++) sum[i][v] = _mm512_fmadd_ps(hr, b[v], sum[i][v]);
    }
  }
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++)
      store16((char *)y + (tokens[i] * ldy + v * 16) * size, sum[i][v], v == nv - 1 ? mask : 0xffff, bf16);
}

#define PROJECT(R) project(x, ldx, tokens, at, rank, in, h, parts * rank, R, bf16)
#define EXPAND(R, NV, MASK) expand(yb, ldy, tokens, h, parts * rank, bt, rank, MASK, R, NV, bf16)
#define EXPAND_ROWS(NV, MASK)             \
  switch (rows) {                         \
    case 1: EXPAND(1, NV, MASK); break;   \
    case 2: EXPAND(2, NV, MASK); break;   \
    case 3: EXPAND(3, NV, MASK); break;   \
    case 4: EXPAND(4, NV, MASK); break;   \
    case 5: EXPAND(5, NV, MASK); break;   \
    default: EXPAND(6, NV, MASK); break;  \
  }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline __attribute__((always_inline)) void delta(const void *x, int64_t ldx, void *y, int64_t ldy,
                                                        const int64_t *slots, int64_t n, const void *a,
                                                        const void *b, const int64_t *part_rows, int64_t parts,
                                                        int64_t in, int64_t rank, int64_t num_slots, int threads,
                                                        const int bf16) {
  const int size = bf16 ? 2 : 4;
  /* tokens grouped by slot: order[start[s] .. start[s + 1]) are slot s's, in batch order */
  int64_t *start = calloc(num_slots + 1, sizeof *start), *next = malloc((num_slots + 1) * sizeof *next);
  int64_t *order = malloc((n + 1) * sizeof *order);
  for (int64_t t = 0; t < n; t++)
    if (slots[t] >= 0 && slots[t] < num_slots) start[slots[t] + 1]++; /* anything else is the base */
  for (int64_t s = 0; s < num_slots; s++) start[s + 1] += start[s];
  memcpy(next, start, (num_slots + 1) * sizeof *next);
  for (int64_t t = 0; t < n; t++)
    if (slots[t] >= 0 && slots[t] < num_slots) order[next[slots[t]]++] = t;
  const int64_t active = start[num_slots];
  /* tiles: up to MR tokens of one slot, from position tile_start[i] */
  int64_t tiles = 0;
  for (int64_t s = 0; s < num_slots; s++) tiles += (start[s + 1] - start[s] + MR - 1) / MR;
  int64_t *tile_start = malloc((tiles + 1) * sizeof *tile_start), *tile_slot = malloc((tiles + 1) * sizeof *tile_slot);
  tiles = 0;
  for (int64_t s = 0; s < num_slots; s++)
    for (int64_t p = start[s]; p < start[s + 1]; p += MR) tile_start[tiles] = p, tile_slot[tiles++] = s;
  /* blocks of b: part, first row within the part, offset within a slot's b */
  int64_t blocks = 0, rows16 = 0;
  for (int64_t p = 0; p < parts; p++) blocks += (part_rows[2 * p + 1] + BLOCK - 1) / BLOCK;
  int64_t *block_part = malloc((blocks + 1) * sizeof *block_part), *block_row = malloc((blocks + 1) * sizeof *block_row);
  int64_t *block_at = malloc((blocks + 1) * sizeof *block_at);
  blocks = 0;
  for (int64_t p = 0; p < parts; p++) {
    for (int64_t c = 0; c < part_rows[2 * p + 1]; c += BLOCK)
      block_part[blocks] = p, block_row[blocks] = c, block_at[blocks++] = rank * (rows16 + c);
    rows16 += (part_rows[2 * p + 1] + 15) / 16 * 16;
  }
  /* h of position j's part p at projected + (j * parts + p) * rank */
  const int64_t vectors = rank / 16;
  float *projected = malloc((active * parts * rank + 1) * sizeof *projected);

#pragma omp parallel num_threads(threads) if (active > 0)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < tiles * parts * vectors; item++) {
      int64_t v = item % vectors, p = item / vectors % parts, i = item / vectors / parts;
      int64_t first = tile_start[i], s = tile_slot[i];
      int rows = (int)min64(start[s + 1] - first, MR);
      const int64_t *tokens = order + first;
      const void *at = (const char *)a + ((s * parts + p) * in * rank + v * 16) * size;
      float *h = projected + (first * parts + p) * rank + v * 16;
      switch (rows) {
        case 1: PROJECT(1); break;
        case 2: PROJECT(2); break;
        case 3: PROJECT(3); break;
        case 4: PROJECT(4); break;
        case 5: PROJECT(5); break;
        default: PROJECT(6); break;
      }
    }
    /* tile-major: a thread runs through one slot's b in order */
#pragma omp for schedule(static)
    for (int64_t item = 0; item < tiles * blocks; item++) {
      int64_t i = item / blocks, j = item % blocks, p = block_part[j];
      int64_t first = tile_start[i], s = tile_slot[i];
      int rows = (int)min64(start[s + 1] - first, MR);
      const int64_t *tokens = order + first;
      int64_t left = part_rows[2 * p + 1] - block_row[j];
      int nv = (int)(min64(left, BLOCK) + 15) / 16;
      __mmask16 mask = left >= nv * 16 ? 0xffff : (__mmask16)((1u << (left - (nv - 1) * 16)) - 1);
      const void *bt = (const char *)b + (s * rank * rows16 + block_at[j]) * size;
      const float *h = projected + (first * parts + p) * rank;
      void *yb = (char *)y + (part_rows[2 * p] + block_row[j]) * size;
      if (mask != 0xffff) {
        switch (nv) {
          case 4: EXPAND_ROWS(4, mask) break;
          case 3: EXPAND_ROWS(3, mask) break;
          case 2: EXPAND_ROWS(2, mask) break;
          default: EXPAND_ROWS(1, mask) break;
        }
      } else {
        switch (nv) {
          case 4: EXPAND_ROWS(4, 0xffff) break;
          case 3: EXPAND_ROWS(3, 0xffff) break;
          case 2: EXPAND_ROWS(2, 0xffff) break;
          default: EXPAND_ROWS(1, 0xffff) break;
        }
      }
    }
  }
  free(projected), free(block_at), free(block_row), free(block_part), free(tile_slot), free(tile_start), free(order),
      free(next), free(start);
}

/* x [n', in] (row stride ldx), y [n', out] (row stride ldy) for n' >= n; slots [n]: each token's slot, -1 (or
   any value outside 0 .. num_slots - 1) the base model; a and b as above, rank % 16 == 0; part_rows
   [parts][2]: each part's first output row and row count */
void lora_delta_f32(const float *x, int64_t ldx, float *y, int64_t ldy, const int64_t *slots, int64_t n,
                    const float *a, const float *b, const int64_t *part_rows, int64_t parts, int64_t in,
                    int64_t rank, int64_t num_slots, int threads) {
  delta(x, ldx, y, ldy, slots, n, a, b, part_rows, parts, in, rank, num_slots, threads, 0);
}

void lora_delta_bf16(const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy, const int64_t *slots, int64_t n,
                     const uint16_t *a, const uint16_t *b, const int64_t *part_rows, int64_t parts, int64_t in,
                     int64_t rank, int64_t num_slots, int threads) {
  delta(x, ldx, y, ldy, slots, n, a, b, part_rows, parts, in, rank, num_slots, threads, 1);
}
