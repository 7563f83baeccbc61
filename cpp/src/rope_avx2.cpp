// AVX2 rows of the RoPE re-rotation (Half layout) for float32 and bfloat16; called only after runtime
// dispatch (cpu_simd_level() != "generic"). Same arithmetic as the portable loop: x*c - y*s, y*c + x*s
// in float32 (no FMA, so results are bit-identical to the portable path), bf16 rounded to nearest even.
#if defined(__GNUC__) && !defined(__clang__)
// This file is built with -mfma: keep mul + sub separate (no contraction) so the results stay
// bit-identical to the portable path on every CPU.
#pragma GCC optimize("fp-contract=off")
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace scrimp {
namespace detail {

namespace {
inline __m256 bf16x8_to_f32(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void f32x8_to_bf16(uint16_t* p, __m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  // NaN -> quiet NaN (high half | 0x40)
  const __m256i absx = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i isnan = _mm256_cmpgt_epi32(absx, _mm256_set1_epi32(0x7f800000));
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, nan, isnan);
  const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}
}  // namespace

// Rotates pairs start, start+W, ... while W remain, in `rows` rows; returns the first pair not handled.
int64_t rotate_half_f32_avx2(const float* in0, float* out0, int64_t hr, const float* c, const float* s, int64_t start,
                        int64_t rows, int64_t in_stride, int64_t out_stride) {
  int64_t i = start;
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = in0 + r * in_stride;
    float* out = out0 + r * out_stride;
    i = start;
    for (; i + 8 <= hr; i += 8) {
      const __m256 x = _mm256_loadu_ps(in + i), y = _mm256_loadu_ps(in + i + hr);
      const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
      _mm256_storeu_ps(out + i, _mm256_sub_ps(_mm256_mul_ps(x, cv), _mm256_mul_ps(y, sv)));
      _mm256_storeu_ps(out + i + hr, _mm256_add_ps(_mm256_mul_ps(y, cv), _mm256_mul_ps(x, sv)));
    }
  }
  return i;
}

int64_t rotate_half_bf16_avx2(const uint16_t* in0, uint16_t* out0, int64_t hr, const float* c, const float* s, int64_t start,
                        int64_t rows, int64_t in_stride, int64_t out_stride) {
  int64_t i = start;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* in = in0 + r * in_stride;
    uint16_t* out = out0 + r * out_stride;
    i = start;
    for (; i + 8 <= hr; i += 8) {
      const __m256 x = bf16x8_to_f32(in + i), y = bf16x8_to_f32(in + i + hr);
      const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
      f32x8_to_bf16(out + i, _mm256_sub_ps(_mm256_mul_ps(x, cv), _mm256_mul_ps(y, sv)));
      f32x8_to_bf16(out + i + hr, _mm256_add_ps(_mm256_mul_ps(y, cv), _mm256_mul_ps(x, sv)));
    }
  }
  return i;
}

}  // namespace detail
}  // namespace scrimp
