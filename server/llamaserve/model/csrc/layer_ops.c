/* A decoder layer's elementwise steps fused, float32 or bfloat16 with torch's roundings (AVX-512):
   the residual add with the RMSNorm that follows it, and SiLU(gate) * up. At decode sizes each is a few
   thousand values, so the torch operators they replace (add_, rms_norm, mul; split, silu, mul_; mul, roll,
   mul, add) cost their dispatch, not their arithmetic.

   bfloat16 rounds where torch's operators do: the sum, the normalised value (F.rms_norm's output), its
   product with the weight; SiLU's output, then its product with up; each of rotary's two products and their
   sum. Sixteen values at a time (a scalar tail where a row is not a multiple of 16): at 64 rows the scalar
   loops took a tenth of a bfloat16 decode step, SiLU's expf most of it. exp16 (vectors.h) is within 1 ulp in
   float32, as Sleef's that torch uses. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vectors.h"

/* Rows past which a call runs in parallel. Below, one thread: a parallel region, even of a team of one inside
   decoder.c's, costs about 0.6 us, more than a decode row's work. */
enum { PARALLEL_ROWS = 8 };

static inline float load1(const void *p, int64_t i, int bf16) {
  if (!bf16) return ((const float *)p)[i];
  uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float round1(float f, int bf16) { /* to the dtype's nearest (even) value */
  if (!bf16) return f;
  uint32_t u;
  memcpy(&u, &f, 4);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  memcpy(&f, &u, 4);
  return f;
}

static inline void store1(void *p, int64_t i, float f, int bf16) {
  if (!bf16) {
    ((float *)p)[i] = f;
    return;
  }
  uint32_t u;
  memcpy(&u, &f, 4);
  ((uint16_t *)p)[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline __m512 round16(__m512 v, int bf16) { /* to the dtype's nearest (even) value, as round1 */
  if (!bf16) return v;
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

static inline float exp1(float x) { /* exp16's value, for the scalar tails */
  float v[16];
  _mm512_storeu_ps(v, exp16(_mm512_set1_ps(x)));
  return v[0];
}

/* Row r of add_rms_norm (below). */
static void norm_row(void *residual, const void *delta, const void *weight, void *out, int64_t r, int64_t hidden,
                     float eps, int bf16) {
  const int64_t base = r * hidden;
  const int64_t vectors = hidden / 16 * 16;
  /* float32 values, their squares summed in double: the mean is float32-exact to rounding, in any order */
  __m512d squares2 = _mm512_setzero_pd();
  for (int64_t i = 0; i < vectors; i += 16) {
    __m512 x = load16(residual, base + i, bf16);
    if (delta) {
      x = round16(_mm512_add_ps(x, load16(delta, base + i, bf16)), bf16);
      store16(residual, base + i, x, bf16);
    }
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    squares2 = _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, squares2));
  }
  double squares = _mm512_reduce_add_pd(squares2);
  for (int64_t i = vectors; i < hidden; i++) {
    float x = load1(residual, base + i, bf16);
    if (delta) {
      x = round1(x + load1(delta, base + i, bf16), bf16);
      store1(residual, base + i, x, bf16);
    }
    squares += (double)x * x;
  }
  float scale = 1.0f / sqrtf((float)(squares / hidden) + eps);
  __m512 scale16 = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < vectors; i += 16) {
    __m512 normed = round16(_mm512_mul_ps(load16(residual, base + i, bf16), scale16), bf16);
    store16(out, base + i, _mm512_mul_ps(normed, load16(weight, i, bf16)), bf16);
  }
  for (int64_t i = vectors; i < hidden; i++) {
    float normed = round1(load1(residual, base + i, bf16) * scale, bf16);
    store1(out, base + i, normed * load1(weight, i, bf16), bf16);
  }
}

/* residual [rows, hidden] += delta (when given); out = rms_norm(residual) * weight. Rows are independent. */
void add_rms_norm(void *residual, const void *delta, const void *weight, void *out, int64_t rows, int64_t hidden,
                  float eps, int bf16, int threads) {
  if (rows > PARALLEL_ROWS) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) norm_row(residual, delta, weight, out, r, hidden, eps, bf16);
  } else {
    for (int64_t r = 0; r < rows; r++) norm_row(residual, delta, weight, out, r, hidden, eps, bf16);
  }
}

/* Row r of silu_mul (below). */
static void silu_row(const void *gate_up, void *out, int64_t r, int64_t inter, int bf16) {
  const int64_t vectors = inter / 16 * 16;
  const int64_t gate = r * 2 * inter, up = gate + inter;
  for (int64_t i = 0; i < vectors; i += 16) {
    __m512 g = load16(gate_up, gate + i, bf16);
    __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(out, r * inter + i, _mm512_mul_ps(round16(silu, bf16), load16(gate_up, up + i, bf16)), bf16);
  }
  for (int64_t i = vectors; i < inter; i++) {
    float g = load1(gate_up, gate + i, bf16);
    store1(out, r * inter + i, round1(g / (1.0f + exp1(-g)), bf16) * load1(gate_up, up + i, bf16), bf16);
  }
}

/* gate_up [rows, 2 * inter] -> out [rows, inter] = silu(gate) * up */
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t inter, int bf16, int threads) {
  if (rows > PARALLEL_ROWS) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) silu_row(gate_up, out, r, inter, bf16);
  } else {
    for (int64_t r = 0; r < rows; r++) silu_row(gate_up, out, r, inter, bf16);
  }
}

/* Token t of rotary (below). */
static void rotary_token(void *x, int64_t t, int64_t stride, int64_t rotated, int64_t head_dim, const void *cos,
                         const void *sin, int bf16) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < rotated; h++) {
    int64_t base = t * stride + h * head_dim;
    float row[512];
    if (half % 16 == 0) {
      for (int64_t i = 0; i < head_dim; i += 16) _mm512_storeu_ps(row + i, load16(x, base + i, bf16));
      for (int64_t i = 0; i < head_dim; i += 16) {
        __m512 c = load16(cos, t * head_dim + i, bf16), s = load16(sin, t * head_dim + i, bf16);
        __m512 rolled = _mm512_loadu_ps(row + (i + half) % head_dim);
        store16(x, base + i, _mm512_add_ps(round16(_mm512_mul_ps(_mm512_loadu_ps(row + i), c), bf16),
                                           round16(_mm512_mul_ps(rolled, s), bf16)), bf16);
      }
      continue;
    }
    for (int64_t i = 0; i < head_dim; i++) row[i] = load1(x, base + i, bf16);
    for (int64_t i = 0; i < head_dim; i++) {
      float c = load1(cos, t * head_dim + i, bf16), s = load1(sin, t * head_dim + i, bf16);
      float rolled = row[(i + half) % head_dim];
      store1(x, base + i, round1(row[i] * c, bf16) + round1(rolled * s, bf16), bf16);
    }
  }
}

/* In place, the first `rotated` heads of each token's [heads, head_dim] row of x (token stride `stride`):
   x * cos + roll(x, head_dim / 2) * sin, with cos, sin [tokens, head_dim] as model/rotary.py lays them out
   (sin's first half negated). head_dim <= 512. */
void rotary(void *x, int64_t tokens, int64_t stride, int64_t rotated, int64_t head_dim, const void *cos,
            const void *sin, int bf16, int threads) {
  if (tokens > PARALLEL_ROWS) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) rotary_token(x, t, stride, rotated, head_dim, cos, sin, bf16);
  } else {
    for (int64_t t = 0; t < tokens; t++) rotary_token(x, t, stride, rotated, head_dim, cos, sin, bf16);
  }
}
