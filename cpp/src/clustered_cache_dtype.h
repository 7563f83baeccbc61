// Internal: scalar loads/stores of float32 / float16 / bfloat16 elements for the IceCache CPU code.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "half.h"
#include "scrimp/tensor.h"

namespace scrimp {
namespace ice {

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf (incl. rounding)
  if (ax < 0x38800000u) {  // subnormal or zero in half
    // value = ax as float; half subnormal unit is 2^-24
    float a;
    std::memcpy(&a, &ax, 4);
    const float scaled = a * 16777216.0f;  // / 2^-24
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));  // round half to even (default mode)
    return static_cast<uint16_t>(sign | m);
  }
  // normal: rebias exponent 127 -> 15, round mantissa 23 -> 10 bits to nearest even
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

inline float load(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::Float32: return static_cast<const float*>(base)[i];
    case DType::Float16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return 0.0f;
  }
}

inline void store(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::Float32: static_cast<float*>(base)[i] = v; break;
    case DType::Float16: static_cast<uint16_t*>(base)[i] = float_to_half(v); break;
    case DType::BFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
    default: break;
  }
}

// dst[i] = (float) src[i] for i < n.
inline void load_row(const void* src, DType dt, int64_t n, float* dst) {
  if (dt == DType::Float32) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (dt == DType::BFloat16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
  }
}

inline bool is_float_kv(DType d) { return d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16; }

}  // namespace ice
}  // namespace scrimp
