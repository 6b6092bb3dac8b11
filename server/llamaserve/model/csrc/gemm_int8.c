/* y = (x @ q^T) * scale for int8 weights with one float32 scale per output row (symmetric, q in -127..127),
   bfloat16 activations and output, float32 sums; AVX-512.

   Blocks of 64 output columns as in gemm_bf16.c (the last may be 16, 32 or 48 wide): for each input i, the
   block's `width` codes in column order, at codes + n0 * k + i * width. A zmm holds 16 columns' products of
   one input: the codes widen to float32 (exact) and x[i], widened once per call, is broadcast, so the sums
   are float32 in input order, whatever the other rows of x. A tile prefetches its codes 4 KiB ahead into L2
   (as gemm_int4.c does: at one row the widening keeps the core too busy for the hardware prefetchers alone). */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64
#define AHEAD 4096 /* bytes */
#define MR 6 /* rows per tile: MR x 4 sums + 4 codes + 1 broadcast <= 32 zmm */

/* q [n, k] int8 row-major -> codes [n * k] in the kernel's layout */
void pack_int8(const int8_t *q, int8_t *codes, int64_t n, int64_t k) {
  for (int64_t n0 = 0; n0 < n; n0 += BLOCK) {
    int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
    for (int64_t i = 0; i < k; i++)
      for (int64_t c = 0; c < width; c++) codes[n0 * k + i * width + c] = q[(n0 + c) * k + i];
  }
}

static inline __attribute__((always_inline)) void tile(const float *x, int64_t k, const int8_t *block,
                                                       const float *scales, uint16_t *y, int64_t ldy, const int rows,
                                                       const int nv) {
  __m512 sum[MR][4];
  for (int r = 0; r < rows; r++)
    for (int v = 0; v < nv; v++) sum[r][v] = _mm512_setzero_ps();
  const int width = nv * 16;
  for (int64_t i = 0; i < k; i++) {
    _mm_prefetch((const char *)(block + i * width) + AHEAD, _MM_HINT_T1);
    __m512 w[4];
    for (int v = 0; v < nv; v++)
      w[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(block + i * width + v * 16))));
    for (int r = 0; r < rows; r++) {
      __m512 xi = _mm512_set1_ps(x[r * k + i]);
      for (int v = 0; v < nv; v++) sum[r][v] = _mm512_fmadd_ps(xi, w[v], sum[r][v]);
    }
  }
  for (int v = 0; v < nv; v++) {
    __m512 scale = _mm512_loadu_ps(scales + v * 16);
    for (int r = 0; r < rows; r++)
      _mm256_storeu_si256((__m256i *)(y + r * ldy + v * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sum[r][v], scale)));
  }
}

#define TILE(R, NV) tile(xf + m0 * k, k, block, scales + n0, y + m0 * n + n0, n, R, NV)
#define ROWS(NV)                \
  switch (rows) {               \
    case 1: TILE(1, NV); break; \
    case 2: TILE(2, NV); break; \
    case 3: TILE(3, NV); break; \
    case 4: TILE(4, NV); break; \
    case 5: TILE(5, NV); break; \
    default: TILE(6, NV); break; \
  }

/* y [m, n] (contiguous) = x [m, k] (row stride ldx) @ (q * scales)^T, q packed by pack_int8; xf [m, k] float32
   scratch; n % 16 == 0 (the caller checks) */
void gemm_int8(const uint16_t *x, int64_t ldx, const int8_t *codes, const float *scales, uint16_t *y, float *xf,
               int64_t m, int64_t n, int64_t k, int threads) {
  for (int64_t r = 0; r < m; r++)
    for (int64_t i = 0; i < k; i++) {
      uint32_t u = (uint32_t)x[r * ldx + i] << 16;
      memcpy(xf + r * k + i, &u, 4);
    }
  int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) {
    int64_t n0 = b * BLOCK;
    int nv = (int)((n - n0 < BLOCK ? n - n0 : BLOCK) / 16);
    const int8_t *block = codes + n0 * k;
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
