/* y = (x @ q^T) * scale for int8 weights with one float32 scale per output row (symmetric, q in -127..127),
   bfloat16 activations and output; AVX-512 VNNI.

   x is rounded to int16 per row in groups of GROUP inputs, xq = round(x / s) with s = max |x| / 32767 (finer than
   bfloat16's 8 bits for every value within 1/128 of its group's largest), and vpdpwssd multiplies codes and xq
   pairs exactly into int32 sums, 32 products an instruction (widening each code to float32 for an FMA made 16,
   and three instructions a product). A group's sums turn float32 times its s; the row scale comes last.

   Blocks of 64 output columns as in gemm_bf16.c (the last may be 16, 32 or 48 wide), each input pair p (k padded
   to even with a zero code) holding, for each column c of the block, its codes for inputs 2p and 2p + 1:
       codes + n0 * kp + p * 2 * width + 2 * c + {0, 1}
   so 32 bytes sign-extend to one vpdpwssd operand of 16 columns. A tile prefetches its codes 4 KiB ahead into
   L2: at one row the hardware prefetchers alone leave the core short of reads in flight. Every row is
   rounded and summed alone, so its result does not depend on the other rows of x. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64
#define GROUP 128 /* inputs per int16 scale: 64 pairs of products of at most 32767 * 127 stay inside int32 */
#define AHEAD 4096 /* bytes */
#define MR 3 /* rows per tile: MR x 4 int32 sums + MR x 4 float32 totals + 4 codes + 1 broadcast <= 32 zmm */

/* q [n, k] int8 row-major -> codes [n * (k rounded up to even)] in the kernel's layout */
void pack_int8(const int8_t *q, int8_t *codes, int64_t n, int64_t k) {
  const int64_t kp = (k + 1) / 2 * 2;
  for (int64_t n0 = 0; n0 < n; n0 += BLOCK) {
    int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
    for (int64_t i = 0; i < kp; i++)
      for (int64_t c = 0; c < width; c++)
        codes[n0 * kp + i / 2 * 2 * width + 2 * c + i % 2] = i < k ? q[(n0 + c) * k + i] : 0;
  }
}

/* the inverse of pack_int8 */
void unpack_int8(const int8_t *codes, int8_t *q, int64_t n, int64_t k) {
  const int64_t kp = (k + 1) / 2 * 2;
  for (int64_t n0 = 0; n0 < n; n0 += BLOCK) {
    int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
    for (int64_t i = 0; i < k; i++)
      for (int64_t c = 0; c < width; c++) q[(n0 + c) * k + i] = codes[n0 * kp + i / 2 * 2 * width + 2 * c + i % 2];
  }
}

static inline __m512 bf16x16(const uint16_t *p) { /* 16 bfloat16 values as float32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline float bf16_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* row x [k] bfloat16 -> xq [kp] int16 (the pad 0) and s [groups]; 16 values at a time, the same roundings as
   the scalar tail's (the default rounding mode's nearest even) */
static void round_row(const uint16_t *x, int64_t k, int64_t kp, int16_t *xq, float *s) {
  for (int64_t g0 = 0; g0 < kp; g0 += GROUP) {
    const int64_t end = g0 + GROUP < k ? g0 + GROUP : k;
    __m512 tops = _mm512_setzero_ps();
    int64_t i = g0;
    for (; i + 16 <= end; i += 16) tops = _mm512_max_ps(tops, _mm512_abs_ps(bf16x16(x + i)));
    float top = _mm512_reduce_max_ps(tops);
    for (; i < end; i++) top = fmaxf(top, fabsf(bf16_to_float(x[i])));
    const float inv = top > 0 ? 32767.0f / top : 0;
    for (i = g0; i + 16 <= end; i += 16) {
      const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(bf16x16(x + i), _mm512_set1_ps(inv)));
      _mm256_storeu_si256((__m256i *)(xq + i), _mm512_cvtsepi32_epi16(rounded));
    }
    for (; i < end; i++) xq[i] = (int16_t)lrintf(bf16_to_float(x[i]) * inv);
    for (; i < g0 + GROUP && i < kp; i++) xq[i] = 0;
    s[g0 / GROUP] = top / 32767.0f;
  }
}

static inline __attribute__((always_inline)) void tile(const int16_t *xq, int64_t kp, const float *xs,
                                                       const int8_t *block, const float *scales, uint16_t *y,
                                                       int64_t ldy, const int rows, const int nv) {
  const int64_t groups = (kp + GROUP - 1) / GROUP;
  __m512 total[MR][4];
  for (int r = 0; r < rows; r++)
    for (int v = 0; v < nv; v++) total[r][v] = _mm512_setzero_ps();
  const int width = nv * 16;
  for (int64_t g = 0; g < groups; g++) {
    __m512i sum[MR][4];
    for (int r = 0; r < rows; r++)
      for (int v = 0; v < nv; v++) sum[r][v] = _mm512_setzero_si512();
    const int64_t end = (g + 1) * GROUP / 2 < kp / 2 ? (g + 1) * GROUP / 2 : kp / 2;
    for (int64_t p = g * GROUP / 2; p < end; p++) {
      const int8_t *pair = block + p * 2 * width;
      _mm_prefetch((const char *)pair + AHEAD, _MM_HINT_T1);
      __m512i w[4];
      for (int v = 0; v < nv; v++) w[v] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(pair + 32 * v)));
      for (int r = 0; r < rows; r++) {
        int32_t two;
        memcpy(&two, xq + r * kp + 2 * p, sizeof two);
        const __m512i xi = _mm512_set1_epi32(two);
        for (int v = 0; v < nv; v++) sum[r][v] = _mm512_dpwssd_epi32(sum[r][v], w[v], xi);
      }
    }
    for (int r = 0; r < rows; r++) {
      const __m512 s = _mm512_set1_ps(xs[r * groups + g]);
      for (int v = 0; v < nv; v++) total[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][v]), s, total[r][v]);
    }
  }
  for (int v = 0; v < nv; v++) {
    __m512 scale = _mm512_loadu_ps(scales + v * 16);
    for (int r = 0; r < rows; r++)
      _mm256_storeu_si256((__m256i *)(y + r * ldy + v * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(total[r][v], scale)));
  }
}

#define TILE(R, NV) tile(xq + m0 * kp, kp, xs + m0 * groups, block, scales + n0, y + m0 * ldy + n0, ldy, R, NV)
#define ROWS(NV)                \
  switch (rows) {               \
    case 1: TILE(1, NV); break; \
    case 2: TILE(2, NV); break; \
    default: TILE(3, NV); break; \
  }

/* Bytes of scratch gemm_int8 needs for m rows of k inputs. */
int64_t int8_scratch_bytes(int64_t m, int64_t k) {
  const int64_t kp = (k + 1) / 2 * 2;
  return m * kp * 2 + m * ((kp + GROUP - 1) / GROUP) * 4;
}

/* Rows [r0, r1) of x [m, k] (row stride ldx) rounded into scratch (int8_scratch_bytes(m, k), 4-byte aligned). */
void int8_prepare(const uint16_t *x, int64_t ldx, void *scratch, int64_t m, int64_t k, int64_t r0, int64_t r1) {
  const int64_t kp = (k + 1) / 2 * 2, groups = (kp + GROUP - 1) / GROUP;
  float *xs = scratch;
  int16_t *xq = (int16_t *)(xs + m * groups);
  for (int64_t r = r0; r < r1; r++) round_row(x + r * ldx, k, kp, xq + r * kp, xs + r * groups);
}

/* Blocks [b0, b1) of y = x @ (q * scales)^T, q packed by pack_int8, x rounded by int8_prepare: y's columns 64 b0
   up to min(n, 64 b1), y's row stride ldy; n % 16 == 0 (the caller checks). One thread. */
void gemm_int8_blocks(const int8_t *codes, const float *scales, uint16_t *y, int64_t ldy, const void *scratch,
                      int64_t m, int64_t n, int64_t k, int64_t b0, int64_t b1) {
  const int64_t kp = (k + 1) / 2 * 2, groups = (kp + GROUP - 1) / GROUP;
  const float *xs = scratch;
  const int16_t *xq = (const int16_t *)(xs + m * groups);
  for (int64_t b = b0; b < b1; b++) {
    int64_t n0 = b * BLOCK;
    int nv = (int)((n - n0 < BLOCK ? n - n0 : BLOCK) / 16);
    const int8_t *block = codes + n0 * kp;
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

/* y [m, n] (contiguous) = x [m, k] (row stride ldx) @ (q * scales)^T, the rows' rounding and the blocks shared
   among `threads`; scratch: int8_scratch_bytes(m, k) bytes, 4-byte aligned */
void gemm_int8(const uint16_t *x, int64_t ldx, const int8_t *codes, const float *scales, uint16_t *y, void *scratch,
               int64_t m, int64_t n, int64_t k, int threads) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (m > 8)
  for (int64_t r = 0; r < m; r++) int8_prepare(x, ldx, scratch, m, k, r, r + 1);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) gemm_int8_blocks(codes, scales, y, n, scratch, m, n, k, b, b + 1);
}
