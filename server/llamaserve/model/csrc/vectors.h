/* Sixteen float32 lanes at a time, shared by the kernels that include this (their libraries hash it with their
   own source, so a change here rebuilds them): loads and stores of float32 or bfloat16 (rounded to nearest
   even, as torch rounds), and exp. */

#ifndef LLAMASERVE_VECTORS_H
#define LLAMASERVE_VECTORS_H

#include <immintrin.h>
#include <stdint.h>

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

/* e^x, within 1 ulp of the float32 result (checked for every x in [-110, 0]); x below -150, -inf included,
   gives 0. Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is exact),
   e^r = 1 + r + r^2 P(r), P of degree 5, then scaled by 2^n (vscalefps, which underflows to 0 cleanly). */
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x); /* -inf would give r = NaN; a NaN x stays NaN */
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

#endif
