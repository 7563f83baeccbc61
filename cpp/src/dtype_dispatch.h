// Internal: the CPU backend's one dtype helper. Scalar float16 / bfloat16 <-> float32 conversions
// (round to nearest even; inf, NaN and subnormals kept), element types for templated kernels,
// dispatch_float() that turns a runtime DType into a compile-time element type, and runtime-dtype
// row loads/stores for code that is not templated. Every CPU kernel converts through here.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "scrimp/error.h"
#include "scrimp/tensor.h"

namespace scrimp {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {  // subnormal half: normalise the mantissa
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): a subnormal in units of 2^-24
    float af;
    std::memcpy(&af, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.0f)));
  }
  uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;  // a carry into the exponent is correct
  return static_cast<uint16_t>(sign | h);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Branch-free (so loops over it vectorize); NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

namespace dtype {

// Storage types of the 16-bit floats (distinct types, so templates can tell them apart).
struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

// Elem<T>: the compute type C of element type T and its load / store.
template <typename T> struct Elem;
template <> struct Elem<float> {
  using C = float;
  static float ld(const float* p) { return *p; }
  static void st(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using C = double;
  static double ld(const double* p) { return *p; }
  static void st(double* p, double v) { *p = v; }
};
template <> struct Elem<F16> {
  using C = float;
  static float ld(const F16* p) { return half_to_float(p->bits); }
  static void st(F16* p, float v) { p->bits = float_to_half(v); }
};
template <> struct Elem<BF16> {
  using C = float;
  static float ld(const BF16* p) { return bf16_to_float(p->bits); }
  static void st(BF16* p, float v) { p->bits = float_to_bf16(v); }
};

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T the element type of `dt`: float, F16, BF16, and double when with_f64.
// Any other dtype is a TypeError naming `what`.
template <typename F>
decltype(auto) dispatch_float(DType dt, const char* what, bool with_f64, F&& f) {
  switch (dt) {
    case DType::Float32: return std::forward<F>(f)(Tag<float>{});
    case DType::Float16: return std::forward<F>(f)(Tag<F16>{});
    case DType::BFloat16: return std::forward<F>(f)(Tag<BF16>{});
    case DType::Float64:
      if (with_f64) return std::forward<F>(f)(Tag<double>{});
      break;
    default: break;
  }
  SCRIMP_CHECK_TYPE(false, what << ": expected float32, float16, bfloat16" << (with_f64 ? " or float64" : "")
                                << ", got " << dtype_name(dt));
  return std::forward<F>(f)(Tag<float>{});  // not reached
}

inline bool is_float_kv(DType d) { return d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16; }

// Runtime-dtype access (float32 / float16 / bfloat16) for code that is not templated on the dtype.
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

// dst[i] = src[i] converted to dt, for i < n.
inline void store_row(const float* src, DType dt, int64_t n, void* dst) {
  if (dt == DType::Float32) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
    return;
  }
  uint16_t* h = static_cast<uint16_t*>(dst);
  if (dt == DType::BFloat16) {
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
  }
}

}  // namespace dtype
}  // namespace scrimp
