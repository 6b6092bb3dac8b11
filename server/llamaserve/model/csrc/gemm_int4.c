/* y = x @ W^T for 4-bit weights in groups, w = q * scale + min (q in 0..15, one bfloat16 scale and minimum
   per `group` consecutive inputs of a row), bfloat16 activations and output, float32 sums; AVX-512 BF16.

   Blocks of 64 output columns as in gemm_bf16.c (the last may be 16, 32 or 48 wide, its unused codes zero).
   For each input pair p of a block, 64 bytes: 16 lanes of 32 bits, lane c holding, for each vector v of 16
   columns, column 16v + c's code for input 2p at bits 4v..4v+3 and for input 2p + 1 at bits 16+4v..19+4v:
       codes + b * 32 * k + p * 64.
   So vector v's 32 codes are one shift and one masked OR away from vdpbf16ps's operand, because a code
   becomes a bfloat16 number without arithmetic: 0x4300 | q is 128 + q exactly. vdpbf16ps against x then sums
   (128 + q) x over a group, S; with X = the group's sum of x, the group adds scale * (S - 128 X) + min * X.
   A block's scales and minimums: for each group g, `width` scales then `width` minimums, at
       params + n0 * (k / group) * 2 + g * 2 * width.
   Both sums are float32 over bfloat16 inputs, in an order that does not depend on the other rows of x.

   Each tile prefetches its codes 4 KiB ahead and its scales 2 KiB ahead into L2 (past its block's end, into the
   next block's, which the same thread reads next): at one row the compute keeps the core too busy for the
   hardware prefetchers alone to keep enough reads in flight (a step's projections read 21 -> 24 GB/s here). */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64
#define CODES_AHEAD 4096 /* bytes */
#define PARAMS_AHEAD 2048
#define MR 3 /* rows per tile: MR x 4 group sums + MR x 4 totals + 4 codes + 1 broadcast + 2 <= 32 zmm */

/* q [n, k] uint8 codes 0..15, scales and mins [n, k / group] float32 -> codes [blocks * 32 * k] (zeroed by
   the caller) and params [n * k / group * 2] bfloat16 (rounded to nearest even) */
void pack_int4(const uint8_t *q, const float *scales, const float *mins, uint8_t *codes, uint16_t *params,
               int64_t n, int64_t k, int64_t group) {
  int64_t groups = k / group;
  for (int64_t n0 = 0; n0 < n; n0 += BLOCK) {
    int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
    uint32_t *lanes = (uint32_t *)(codes + n0 / BLOCK * 32 * k);
    for (int64_t p = 0; p < k / 2; p++)
      for (int64_t c = 0; c < width; c++) {
        const uint8_t *row = q + (n0 + c) * k;
        int64_t v = c / 16;
        lanes[p * 16 + c % 16] |= (uint32_t)(row[2 * p] & 15) << (4 * v) | (uint32_t)(row[2 * p + 1] & 15)
                                                                                 << (16 + 4 * v);
      }
    for (int64_t g = 0; g < groups; g++)
      for (int64_t c = 0; c < width; c++) {
        float pair[2] = {scales[(n0 + c) * groups + g], mins[(n0 + c) * groups + g]};
        for (int j = 0; j < 2; j++) {
          uint32_t u;
          memcpy(&u, &pair[j], 4);
          u += 0x7FFF + ((u >> 16) & 1);
          params[n0 * groups * 2 + g * 2 * width + j * width + c] = (uint16_t)(u >> 16);
        }
      }
  }
}

/* vector v's codes from a pair's 64 bytes: (lanes >> 4v) & 0x000F000F | 0x43004300 */
static inline __m512bh decode(__m512i lanes, const int v) {
  return (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 4 * v), _mm512_set1_epi32(0x000F000F),
                                             _mm512_set1_epi32(0x43004300), 0xEA); /* (a & b) | c */
}

static inline __m512 bf16_to_ps(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t ldx, const float *xsum,
                                                       int64_t groups, const uint8_t *codes, const uint16_t *params,
                                                       int64_t k, int64_t group, uint16_t *y, int64_t ldy,
                                                       const int rows, const int nv) {
  __m512 total[MR][4];
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++) total[i][v] = _mm512_setzero_ps();
  const int width = nv * 16;
  for (int64_t g = 0; g < groups; g++) {
    __m512 s[MR][4];
    for (int i = 0; i < rows; i++)
      for (int v = 0; v < nv; v++) s[i][v] = _mm512_setzero_ps();
    const uint16_t *gp = params + g * 2 * width;
    for (int line = 0; line < nv; line++) /* a group's 2 * width bfloat16 parameters: nv lines */
      _mm_prefetch((const char *)gp + PARAMS_AHEAD + 64 * line, _MM_HINT_T1);
    for (int64_t p = g * group / 2; p < (g + 1) * group / 2; p++) {
      _mm_prefetch((const char *)codes + p * 64 + CODES_AHEAD, _MM_HINT_T1);
      __m512i lanes = _mm512_loadu_si512(codes + p * 64);
      __m512bh w[4];
      for (int v = 0; v < nv; v++) w[v] = decode(lanes, v);
      for (int i = 0; i < rows; i++) {
        int32_t pair;
        memcpy(&pair, x + i * ldx + 2 * p, sizeof pair);
        __m512bh xi = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < nv; v++) s[i][v] = _mm512_dpbf16_ps(s[i][v], xi, w[v]);
      }
    }
    for (int v = 0; v < nv; v++) {
      __m512 scale = bf16_to_ps(gp + v * 16), min = bf16_to_ps(gp + width + v * 16);
      for (int i = 0; i < rows; i++) {
        __m512 sum = _mm512_set1_ps(xsum[i * groups + g]);
        __m512 t = _mm512_fmadd_ps(sum, _mm512_set1_ps(-128.0f), s[i][v]); /* S - 128 X */
        total[i][v] = _mm512_fmadd_ps(sum, min, _mm512_fmadd_ps(t, scale, total[i][v]));
      }
    }
  }
  for (int i = 0; i < rows; i++)
    for (int v = 0; v < nv; v++)
      _mm256_storeu_si256((__m256i *)(y + i * ldy + v * 16), (__m256i)_mm512_cvtneps_pbh(total[i][v]));
}

#define TILE(R, NV) \
  tile(x + m0 * ldx, ldx, xsum + m0 * groups, groups, block, bparams, k, group, y + m0 * ldy + n0, ldy, R, NV)
#define ROWS(NV)                \
  switch (rows) {               \
    case 1: TILE(1, NV); break; \
    case 2: TILE(2, NV); break; \
    default: TILE(3, NV); break; \
  }

/* Rows [r0, r1) of xsum [m, k / group] float32: each row's sum of x [m, k] (row stride ldx) over each group, 16
   lanes at a time while 16 remain (the lanes' sums then added together), one by one after. */
void int4_prepare(const uint16_t *x, int64_t ldx, float *xsum, int64_t k, int64_t group, int64_t r0, int64_t r1) {
  int64_t groups = k / group;
  for (int64_t i = r0; i < r1; i++)
    for (int64_t g = 0; g < groups; g++) {
      const uint16_t *in = x + i * ldx + g * group;
      __m512 lanes = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= group; j += 16) lanes = _mm512_add_ps(lanes, bf16_to_ps(in + j));
      float sum = _mm512_reduce_add_ps(lanes);
      for (; j < group; j++) {
        uint32_t u = (uint32_t)in[j] << 16;
        float f;
        memcpy(&f, &u, 4);
        sum += f;
      }
      xsum[i * groups + g] = sum;
    }
}

/* Blocks [b0, b1) of y = x [m, k] (row stride ldx) @ W^T, W packed by pack_int4, xsum from int4_prepare: y's
   columns 64 b0 up to min(n, 64 b1), y's row stride ldy; n % 16 == 0, group even and dividing k (the caller
   checks). One thread. */
void gemm_int4_blocks(const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *params, uint16_t *y,
                      int64_t ldy, const float *xsum, int64_t m, int64_t n, int64_t k, int64_t group, int64_t b0,
                      int64_t b1) {
  int64_t groups = k / group;
  for (int64_t b = b0; b < b1; b++) {
    int64_t n0 = b * BLOCK;
    int nv = (int)((n - n0 < BLOCK ? n - n0 : BLOCK) / 16);
    const uint8_t *block = codes + b * 32 * k;
    const uint16_t *bparams = params + n0 * groups * 2;
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

/* y [m, n] (contiguous) = x @ W^T, the blocks shared among `threads`; xsum [m, k / group] float32 scratch */
void gemm_int4(const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *params, uint16_t *y,
               float *xsum, int64_t m, int64_t n, int64_t k, int64_t group, int threads) {
  int64_t blocks = (n + BLOCK - 1) / BLOCK;
  int4_prepare(x, ldx, xsum, k, group, 0, m);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) gemm_int4_blocks(x, ldx, codes, params, y, n, xsum, m, n, k, group, b, b + 1);
}
