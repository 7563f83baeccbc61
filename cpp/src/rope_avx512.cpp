// AVX-512 rows of the RoPE re-rotation (Half layout) for float32 and bfloat16; called only after
// runtime dispatch (cpu_simd_level() == "avx512"). Same arithmetic and rounding as the portable loop
// (mul and sub kept separate), so results are bit-identical on every path.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h under the optimize pragma.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

namespace scrimp {
namespace detail {

namespace {
inline __m512 bf16x16_to_f32(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void f32x16_to_bf16(uint16_t* p, __m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i absx = _mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 isnan = _mm512_cmpgt_epi32_mask(absx, _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, isnan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
}  // namespace

int64_t rotate_half_f32_avx512(const float* in0, float* out0, int64_t hr, const float* c, const float* s, int64_t start,
                        int64_t rows, int64_t in_stride, int64_t out_stride) {
  int64_t i = start;
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = in0 + r * in_stride;
    float* out = out0 + r * out_stride;
    i = start;
    for (; i + 16 <= hr; i += 16) {
      const __m512 x = _mm512_loadu_ps(in + i), y = _mm512_loadu_ps(in + i + hr);
      const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
      _mm512_storeu_ps(out + i, _mm512_sub_ps(_mm512_mul_ps(x, cv), _mm512_mul_ps(y, sv)));
      _mm512_storeu_ps(out + i + hr, _mm512_add_ps(_mm512_mul_ps(y, cv), _mm512_mul_ps(x, sv)));
    }
  }
  return i;
}

int64_t rotate_half_bf16_avx512(const uint16_t* in0, uint16_t* out0, int64_t hr, const float* c, const float* s, int64_t start,
                        int64_t rows, int64_t in_stride, int64_t out_stride) {
  int64_t i = start;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* in = in0 + r * in_stride;
    uint16_t* out = out0 + r * out_stride;
    i = start;
    for (; i + 16 <= hr; i += 16) {
      const __m512 x = bf16x16_to_f32(in + i), y = bf16x16_to_f32(in + i + hr);
      const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
      f32x16_to_bf16(out + i, _mm512_sub_ps(_mm512_mul_ps(x, cv), _mm512_mul_ps(y, sv)));
      f32x16_to_bf16(out + i + hr, _mm512_add_ps(_mm512_mul_ps(y, cv), _mm512_mul_ps(x, sv)));
    }
  }
  return i;
}

}  // namespace detail
}  // namespace scrimp
