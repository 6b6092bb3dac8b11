/* y = x @ W^T in bfloat16 with float32 accumulation, for CPUs with AVX-512 BF16 (vdpbf16ps).

   oneDNN's packed bfloat16 matmul reads its weight at about half the memory bandwidth when x has one row
   (a decode step at batch 1 reads every weight once, so that is the step's bound). This kernel streams a
   weight packed for it, as one sequential run per block of 64 output columns:

     packed block of width w (64, or 16/32/48 for the last): k-pair p, column c, j in {0, 1} at
       block[(p * w + c) * 2 + j] = W[n0 + c][2p + j],  block = packed + n0 * K

   so one zmm holds 16 columns x 2 inputs, and vdpbf16ps against x's pair (2p, 2p+1) broadcast adds both
   products into each column's float32 sum. A tile is up to MR rows of x by one block's columns, all its
   sums in registers; a block's weights are read once from memory for all of x's rows (from cache after
   the first tile). Every output element sums its products in the same order whatever M is, so a row's
   result never depends on the rows beside it. Loads are prefetched 4 KiB ahead into L2 (as in gemm_int4.c):
   the hardware prefetchers alone left the batch-1 bfloat16 step 9% slower.

   Parallel over blocks with OpenMP: the library links libgomp.so.1, which the dynamic loader resolves
   to the copy torch has loaded, so these loops run on torch's own thread pool. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64   /* output columns per packed block */
#define AHEAD 4096 /* bytes of the block stream a tile prefetches into L2 ahead of its loads */
#define MR 6       /* rows of x per tile: MR x 4 accumulators + 4 weight registers + 1 broadcast <= 32 zmm */

void pack_bf16(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
  for (int64_t n0 = 0; n0 < n; n0 += BLOCK) {
    int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
    uint16_t *block = packed + n0 * k;
    for (int64_t p = 0; p < k / 2; p++)
      for (int64_t c = 0; c < width; c++)
        memcpy(block + (p * width + c) * 2, w + (n0 + c) * k + 2 * p, 2 * sizeof(uint16_t));
  }
}

void unpack_bf16(const uint16_t *packed, uint16_t *w, int64_t n, int64_t k) {
  for (int64_t n0 = 0; n0 < n; n0 += BLOCK) {
    int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
    const uint16_t *block = packed + n0 * k;
    for (int64_t p = 0; p < k / 2; p++)
      for (int64_t c = 0; c < width; c++)
        memcpy(w + (n0 + c) * k + 2 * p, block + (p * width + c) * 2, 2 * sizeof(uint16_t));
  }
}

/* rows x [rows, ldx] by one block of nv * 16 columns -> y [rows, ldy]; rows and nv are constants after
   inlining, so the sums live in registers */
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t ldx, const uint16_t *block,
                                                       int64_t k, uint16_t *y, int64_t ldy, const int rows,
                                                       const int nv) {
  __m512 sum[MR][4];
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++) sum[i][v] = _mm512_setzero_ps();
  const int width = nv * 16;
  for (int64_t p = 0; p < k / 2; p++) {
    __m512bh w[4];
    for (int v = 0; v < nv; v++) _mm_prefetch((const char *)(block + (p * width + v * 16) * 2) + AHEAD, _MM_HINT_T1);
    for (int v = 0; v < nv; v++) w[v] = (__m512bh)_mm512_loadu_si512(block + (p * width + v * 16) * 2);
    for (int i = 0; i < rows; i++) {
      int32_t pair;
      memcpy(&pair, x + i * ldx + 2 * p, sizeof pair);
      __m512bh xi = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < nv; v++) sum[i][v] = _mm512_dpbf16_ps(sum[i][v], xi, w[v]);
    }
  }
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++)
      _mm256_storeu_si256((__m256i *)(y + i * ldy + v * 16), (__m256i)_mm512_cvtneps_pbh(sum[i][v]));
}

#define TILE(R, NV) tile(x + m0 * ldx, ldx, block, k, y + m0 * ldy + n0, ldy, R, NV)
#define ROWS(NV)                                   \
  switch (rows) {                                  \
    case 1: TILE(1, NV); break;                    \
    case 2: TILE(2, NV); break;                    \
    case 3: TILE(3, NV); break;                    \
    case 4: TILE(4, NV); break;                    \
    case 5: TILE(5, NV); break;                    \
    default: TILE(6, NV); break;                   \
  }

/* Blocks [b0, b1) of y = x [m, k] (row stride ldx) @ W^T, W [n, k] packed by pack_bf16: y's columns 64 b0 up to
   min(n, 64 b1), y's row stride ldy; n % 16 == 0 and k % 2 == 0 (the caller checks). One thread. */
void gemm_bf16_blocks(const uint16_t *x, int64_t ldx, const uint16_t *packed, uint16_t *y, int64_t ldy, int64_t m,
                      int64_t n, int64_t k, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; b++) {
    int64_t n0 = b * BLOCK;
    int nv = (int)((n - n0 < BLOCK ? n - n0 : BLOCK) / 16);
    const uint16_t *block = packed + n0 * k;
    for (int64_t m0 = 0; m0 < m; m0 += MR) {
      int rows = (int)(m - m0 < MR ? m - m0 : MR);
      switch (nv) {
        case 4: ROWS(4) break;
        case 3: ROWS(3) break;
        case 2: ROWS(2) break;
        default: ROWS(1) break;
      }
    }
  }
}

/* y [m, n] (contiguous) = x [m, k] (row stride ldx) @ W^T, the blocks shared among `threads` */
void gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *packed, uint16_t *y, int64_t m, int64_t n,
               int64_t k, int threads) {
  int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) gemm_bf16_blocks(x, ldx, packed, y, n, m, n, k, b, b + 1);
}
