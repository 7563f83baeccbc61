// Internal: the float32 row helpers IceCache's units share (page tree, selection): dot products and
// normalisation of [D] rows.
#pragma once
#include <cmath>
#include <cstdint>

namespace scrimp {
namespace ice {

// Scales v [D] to unit length (a zero row stays zero).
inline void normalize(float* v, int64_t D) {
  double n = 0;
  for (int64_t d = 0; d < D; ++d) n += static_cast<double>(v[d]) * v[d];
  const float inv = n > 0 ? static_cast<float>(1.0 / std::sqrt(n)) : 0.0f;
  for (int64_t d = 0; d < D; ++d) v[d] *= inv;
}

// a . b over [D] floats.
inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

}  // namespace ice
}  // namespace scrimp
