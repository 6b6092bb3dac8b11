/* A decoder layer's elementwise steps fused, float32 or bfloat16 with torch's roundings (AVX-512):
   the residual add with the RMSNorm that follows it, and SiLU(gate) * up. At decode sizes each is a few
   thousand values, so the torch operators they replace (add_, rms_norm, mul; split, silu, mul_; mul, roll,
   mul, add) cost their dispatch, not their arithmetic.

   bfloat16 rounds where torch's operators do: the sum, the normalised value (F.rms_norm's output), its
   product with the weight; SiLU's output, then its product with up; each of rotary's two products and their
   sum. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* residual [rows, hidden] += delta (when given); out = rms_norm(residual) * weight. Rows are independent. */
void add_rms_norm(void *residual, const void *delta, const void *weight, void *out, int64_t rows, int64_t hidden,
                  float eps, int bf16, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 8)
  for (int64_t r = 0; r < rows; r++) {
    int64_t base = r * hidden;
    double squares = 0; /* float32 values, summed in double: the mean is float32-exact to rounding */
    for (int64_t i = 0; i < hidden; i++) {
      float x = load1(residual, base + i, bf16);
      if (delta) {
        x = round1(x + load1(delta, base + i, bf16), bf16);
        store1(residual, base + i, x, bf16);
      }
      squares += (double)x * x;
    }
    float scale = 1.0f / sqrtf((float)(squares / hidden) + eps);
    for (int64_t i = 0; i < hidden; i++) {
      float normed = round1(load1(residual, base + i, bf16) * scale, bf16);
      store1(out, base + i, normed * load1(weight, i, bf16), bf16);
    }
  }
}

/* gate_up [rows, 2 * inter] -> out [rows, inter] = silu(gate) * up */
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t inter, int bf16, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 8)
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < inter; i++) {
      float g = load1(gate_up, r * 2 * inter + i, bf16), u = load1(gate_up, r * 2 * inter + inter + i, bf16);
      store1(out, r * inter + i, round1(g / (1.0f + expf(-g)), bf16) * u, bf16);
    }
}

/* In place, the first `rotated` heads of each token's [heads, head_dim] row of x (token stride `stride`):
   x * cos + roll(x, head_dim / 2) * sin, with cos, sin [tokens, head_dim] as model/rotary.py lays them out
   (sin's first half negated). */
void rotary(void *x, int64_t tokens, int64_t stride, int64_t rotated, int64_t head_dim, const void *cos,
            const void *sin, int bf16, int threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens > 8)
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t h = 0; h < rotated; h++) {
      int64_t base = t * stride + h * head_dim;
      float row[512];
      for (int64_t i = 0; i < head_dim; i++) row[i] = load1(x, base + i, bf16);
      for (int64_t i = 0; i < head_dim; i++) {
        float c = load1(cos, t * head_dim + i, bf16), s = load1(sin, t * head_dim + i, bf16);
        float rolled = row[(i + half) % head_dim];
        store1(x, base + i, round1(row[i] * c, bf16) + round1(rolled * s, bf16), bf16);
      }
    }
}
