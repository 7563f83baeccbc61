// CPU kernels of RoPE re-rotation and packet assembly (+ argument checks, CUDA dispatch).
#include "scrimp/rope.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#include "half.h"
#include "scrimp/build_info.h"
#include "scrimp/error.h"

#if defined(SCRIMP_WITH_CUDA)
#include "rope_cuda.h"
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace scrimp {

#if defined(SCRIMP_X86_SIMD)
namespace detail {
int64_t rotate_half_f32_avx2(const float* in, float* out, int64_t hr, const float* c, const float* s, int64_t start,
                             int64_t rows, int64_t in_stride, int64_t out_stride);
int64_t rotate_half_bf16_avx2(const uint16_t* in, uint16_t* out, int64_t hr, const float* c, const float* s, int64_t start,
                             int64_t rows, int64_t in_stride, int64_t out_stride);
int64_t rotate_half_f32_avx512(const float* in, float* out, int64_t hr, const float* c, const float* s, int64_t start,
                             int64_t rows, int64_t in_stride, int64_t out_stride);
int64_t rotate_half_bf16_avx512(const uint16_t* in, uint16_t* out, int64_t hr, const float* c, const float* s, int64_t start,
                             int64_t rows, int64_t in_stride, int64_t out_stride);
}  // namespace detail
#endif

namespace {

// 0: portable, 1: AVX2, 2: AVX-512 (decided once per process from cpu_simd_level()).
int simd_path() {
#if defined(SCRIMP_X86_SIMD)
  static const int level = std::strcmp(cpu_simd_level(), "avx512") == 0 ? 2
                           : std::strcmp(cpu_simd_level(), "avx2") == 0  ? 1
                                                                         : 0;
  return level;
#else
  return 0;
#endif
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0));  // inf/nan
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (mag < 0x38800000u) {  // subnormal or zero: round to nearest even at 2^-24
    float a;
    std::memcpy(&a, &mag, 4);
    const float scaled = a * 16777216.0f;  // exact power-of-two scaling
    const uint32_t r = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | r);
  }
  // normal: rebias, round to nearest even on the 13 dropped bits
  uint32_t h = ((mag - 0x38000000u) >> 13);
  const uint32_t rem = mag & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  // Round to nearest even; NaN stays a (quiet) NaN. Branch-free so the loops vectorize.
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

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
struct F16 { uint16_t v; };
struct BF16 { uint16_t v; };
template <> struct Elem<F16> {
  using C = float;
  static float ld(const F16* p) { return half_to_float(p->v); }
  static void st(F16* p, float v) { p->v = float_to_half(v); }
};
template <> struct Elem<BF16> {
  using C = float;
  static float ld(const BF16* p) { return bf16_to_float(p->v); }
  static void st(BF16* p, float v) { p->v = float_to_bf16(v); }
};

// Rotate `rows` rows of D elements (row r at in + r * in_stride -> out + r * out_stride).
// cs = [cos_0 .. cos_{R/2-1}, sin_0 .. sin_{R/2-1}] (split so the Half layout is a plain stream).
template <typename T>
inline void rotate_rows(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t rows, int64_t D,
                        int64_t half_r, const typename Elem<T>::C* cs, RopeLayout layout) {
  using C = typename Elem<T>::C;
  const C* __restrict__ cosv = cs;
  const C* __restrict__ sinv = cs + half_r;
  int64_t done = 0;  // pairs handled by the SIMD rows (Half layout only)
#if defined(SCRIMP_X86_SIMD)
  if (layout == RopeLayout::Half) {
    const int path = simd_path();
    if constexpr (std::is_same<T, float>::value) {
      if (path == 2) done = detail::rotate_half_f32_avx512(in, out, half_r, cosv, sinv, done, rows, in_stride, out_stride);
      if (path >= 1) done = detail::rotate_half_f32_avx2(in, out, half_r, cosv, sinv, done, rows, in_stride, out_stride);
    } else if constexpr (std::is_same<T, BF16>::value) {
      const uint16_t* i16 = reinterpret_cast<const uint16_t*>(in);
      uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
      if (path == 2) done = detail::rotate_half_bf16_avx512(i16, o16, half_r, cosv, sinv, done, rows, in_stride, out_stride);
      if (path >= 1) done = detail::rotate_half_bf16_avx2(i16, o16, half_r, cosv, sinv, done, rows, in_stride, out_stride);
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = in + r * in_stride;
    T* dst = out + r * out_stride;
    if (layout == RopeLayout::Half) {
      // Pairs (i, i + R/2); both read before either is written, so in place is safe.
      for (int64_t i = done; i < half_r; ++i) {
        const C x = Elem<T>::ld(src + i), y = Elem<T>::ld(src + i + half_r);
        Elem<T>::st(dst + i, x * cosv[i] - y * sinv[i]);
        Elem<T>::st(dst + i + half_r, y * cosv[i] + x * sinv[i]);
      }
    } else {
      for (int64_t i = 0; i < half_r; ++i) {
        const C x = Elem<T>::ld(src + 2 * i), y = Elem<T>::ld(src + 2 * i + 1);
        Elem<T>::st(dst + 2 * i, x * cosv[i] - y * sinv[i]);
        Elem<T>::st(dst + 2 * i + 1, y * cosv[i] + x * sinv[i]);
      }
    }
    if (dst != src)
      for (int64_t i = 2 * half_r; i < D; ++i) dst[i] = src[i];
  }
}

template <typename C>
void fill_cs(C* cs, int64_t delta, const std::vector<double>& inv_freq) {
  const std::size_t h = inv_freq.size();
  for (std::size_t i = 0; i < h; ++i) {
    const double a = static_cast<double>(delta) * inv_freq[i];
    cs[i] = static_cast<C>(std::cos(a));
    cs[h + i] = static_cast<C>(std::sin(a));
  }
}

template <typename T>
void rerotate_cpu(const RerotateArgs& a) {
  using C = typename Elem<T>::C;
  const int64_t B = a.keys.shape[0], H = a.keys.shape[1], S = a.keys.shape[2], D = a.keys.shape[3];
  const int64_t hr = static_cast<int64_t>(a.inv_freq.size());
  const int64_t* dpp = a.delta_per_pos ? static_cast<const int64_t*>(a.delta_per_pos->data) : nullptr;
  const int64_t dstride = a.delta_per_pos ? a.delta_per_pos->strides[0] : 0;
  const int64_t ntab = dpp ? S : 1;
  std::vector<C> cs(static_cast<std::size_t>(ntab * 2 * hr));
  for (int64_t s = 0; s < ntab; ++s) fill_cs(cs.data() + s * 2 * hr, dpp ? dpp[s * dstride] : a.delta, a.inv_freq);
  const T* in = static_cast<const T*>(a.keys.data);
  T* out = static_cast<T*>(a.out.data);
  const int64_t rows = B * H * S;
#pragma omp parallel for schedule(static) if (rows * D > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = r % S, h = (r / S) % H, b = r / (S * H);
    const T* src = in + b * a.keys.strides[0] + h * a.keys.strides[1] + s * a.keys.strides[2];
    T* dst = out + b * a.out.strides[0] + h * a.out.strides[1] + s * a.out.strides[2];
    rotate_rows<T>(src, 0, dst, 0, 1, D, hr, cs.data() + (dpp ? s * 2 * hr : 0), a.layout);
  }
}

template <typename T>
void assemble_cpu(const AssembleArgs& a) {
  using C = typename Elem<T>::C;
  const int64_t L = static_cast<int64_t>(a.out_keys.size());
  const int64_t P = static_cast<int64_t>(a.parts.size());
  std::vector<std::vector<C>> cs(P);
  std::vector<int64_t> start(P);
  int64_t pos = a.seq_offset;
  for (int64_t p = 0; p < P; ++p) {
    cs[p].resize(2 * a.parts[p].inv_freq.size());
    fill_cs(cs[p].data(), a.parts[p].delta, a.parts[p].inv_freq);
    start[p] = pos;
    pos += a.parts[p].keys[0].shape[1];
  }
  const int64_t H = a.out_keys[0].shape[1], D = a.out_keys[0].shape[3];
  const std::size_t row_bytes = static_cast<std::size_t>(D) * sizeof(T);
  // One task per (layer, part, head): rotate its K rows, copy its V rows.
  const int64_t tasks = L * P * H;
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t h = task % H, p = (task / H) % P, l = task / (H * P);
    const AssemblePart& part = a.parts[p];
    const int64_t T_ = part.keys[l].shape[1];
    const int64_t hr = static_cast<int64_t>(part.inv_freq.size());
    const T* ks = static_cast<const T*>(part.keys[l].data) + h * T_ * D;
    const T* vs = static_cast<const T*>(part.values[l].data) + h * T_ * D;
    const TensorView& ok = a.out_keys[l];
    const TensorView& ov = a.out_values[l];
    T* kd = static_cast<T*>(ok.data) + h * ok.strides[1] + start[p] * ok.strides[2];
    T* vd = static_cast<T*>(ov.data) + h * ov.strides[1] + start[p] * ov.strides[2];
    rotate_rows<T>(ks, D, kd, ok.strides[2], T_, D, hr, cs[p].data(), part.layout);
    if (ov.strides[2] == D) {
      std::memcpy(vd, vs, row_bytes * T_);
    } else {
      for (int64_t t = 0; t < T_; ++t) std::memcpy(vd + t * ov.strides[2], vs + t * D, row_bytes);
    }
  }
}

void check_rope(const std::vector<double>& inv_freq, int64_t D, const char* what) {
  SCRIMP_CHECK(!inv_freq.empty(), what << ": inv_freq is empty");
  SCRIMP_CHECK(static_cast<int64_t>(inv_freq.size()) * 2 <= D,
               what << ": inv_freq has " << inv_freq.size() << " entries, more than head_dim/2 = " << D / 2);
  for (double f : inv_freq) SCRIMP_CHECK(std::isfinite(f), what << ": inv_freq must be finite");
}

bool is_float_kind(DType t) {
  return t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16 || t == DType::Float64;
}

}  // namespace

void rerotate_keys(const RerotateArgs& a) {
  SCRIMP_CHECK(a.keys.ndim() == 4, "keys: expected [batch, kv_heads, seq, head_dim], got " << describe(a.keys));
  SCRIMP_CHECK_TYPE(is_float_kind(a.keys.dtype), "keys: expected a floating dtype, got " << describe(a.keys));
  SCRIMP_CHECK(a.out.shape == a.keys.shape, "out: expected the shape of keys " << describe(a.keys) << ", got " << describe(a.out));
  SCRIMP_CHECK_TYPE(a.out.dtype == a.keys.dtype, "out: expected dtype " << dtype_name(a.keys.dtype) << ", got " << describe(a.out));
  SCRIMP_CHECK(a.out.device == a.keys.device, "out: expected device " << device_name(a.keys.device));
  SCRIMP_CHECK(a.keys.shape[3] <= 1 || a.keys.strides[3] == 1, "keys: head_dim must be contiguous, got strides of " << describe(a.keys));
  SCRIMP_CHECK(a.out.shape[3] <= 1 || a.out.strides[3] == 1, "out: head_dim must be contiguous");
  check_rope(a.inv_freq, a.keys.shape[3], "rerotate_keys");
  if (a.delta_per_pos) {
    const TensorView& d = *a.delta_per_pos;
    SCRIMP_CHECK_TYPE(d.dtype == DType::Int64, "delta: expected an int64 tensor, got " << describe(d));
    SCRIMP_CHECK(d.ndim() == 1 && d.shape[0] == a.keys.shape[2],
                 "delta: expected shape [seq] = [" << a.keys.shape[2] << "], got " << describe(d));
    SCRIMP_CHECK(d.device == a.keys.device, "delta: expected device " << device_name(a.keys.device));
  }
  if (a.keys.numel() == 0) return;
  if (a.keys.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::rerotate_keys(a);
    return;
#else
    SCRIMP_FAIL("CUDA tensors given, but this build of scrimp has no CUDA backend");
#endif
  }
  switch (a.keys.dtype) {
    case DType::Float32: rerotate_cpu<float>(a); break;
    case DType::Float64: rerotate_cpu<double>(a); break;
    case DType::Float16: rerotate_cpu<F16>(a); break;
    case DType::BFloat16: rerotate_cpu<BF16>(a); break;
    default: break;
  }
}

void assemble_kv(const AssembleArgs& a) {
  const int64_t L = static_cast<int64_t>(a.out_keys.size());
  SCRIMP_CHECK(L > 0 && static_cast<int64_t>(a.out_values.size()) == L,
               "assemble: expected the same number (> 0) of key and value outputs, got " << a.out_keys.size() << " and "
                                                                                       << a.out_values.size());
  SCRIMP_CHECK(!a.parts.empty(), "assemble: no packets given");
  const TensorView& o0 = a.out_keys[0];
  SCRIMP_CHECK(o0.ndim() == 4 && o0.shape[0] == 1, "assemble: outputs must be [1, H, S, D], got " << describe(o0));
  const int64_t H = o0.shape[1], S = o0.shape[2], D = o0.shape[3];
  for (int64_t l = 0; l < L; ++l)
    for (const TensorView* o : {&a.out_keys[l], &a.out_values[l]}) {
      SCRIMP_CHECK(o->shape == o0.shape, "assemble: output " << l << " is " << describe(*o) << ", expected the shape of " << describe(o0));
      SCRIMP_CHECK_TYPE(o->dtype == o0.dtype, "assemble: outputs must share one dtype");
      SCRIMP_CHECK(o->device == o0.device, "assemble: outputs must share one device");
      SCRIMP_CHECK(D <= 1 || o->strides[3] == 1, "assemble: output head_dim must be contiguous");
    }
  int64_t total = a.seq_offset;
  SCRIMP_CHECK(a.seq_offset >= 0, "assemble: seq_offset must be >= 0");
  for (std::size_t p = 0; p < a.parts.size(); ++p) {
    const AssemblePart& part = a.parts[p];
    SCRIMP_CHECK(static_cast<int64_t>(part.keys.size()) == L && static_cast<int64_t>(part.values.size()) == L,
                 "assemble: packet " << p << " has " << part.keys.size() << " layers, the output " << L);
    const int64_t T = part.keys[0].shape[1];
    for (int64_t l = 0; l < L; ++l)
      for (const TensorView* t : {&part.keys[l], &part.values[l]}) {
        SCRIMP_CHECK_TYPE(t->dtype == o0.dtype, "assemble: packet " << p << " has dtype " << dtype_name(t->dtype)
                                                                   << ", the output " << dtype_name(o0.dtype));
        SCRIMP_CHECK(t->ndim() == 3 && t->shape[0] == H && t->shape[1] == T && t->shape[2] == D && t->is_contiguous(),
                     "assemble: packet " << p << " layer " << l << " is " << describe(*t) << ", expected contiguous ["
                                         << H << ", " << T << ", " << D << "] (kv_heads x head_dim must match the output)");
        SCRIMP_CHECK(t->device == o0.device, "assemble: packet " << p << " is on " << device_name(t->device)
                                                                 << ", the output on " << device_name(o0.device));
      }
    check_rope(part.inv_freq, D, "assemble");
    total += T;
  }
  SCRIMP_CHECK(total <= S, "assemble: the packets need " << total << " positions (from seq_offset " << a.seq_offset
                                                         << "), the output holds " << S);
  if (o0.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::assemble_kv(a);
    return;
#else
    SCRIMP_FAIL("CUDA tensors given, but this build of scrimp has no CUDA backend");
#endif
  }
  switch (o0.dtype) {
    case DType::Float32: assemble_cpu<float>(a); break;
    case DType::Float64: assemble_cpu<double>(a); break;
    case DType::Float16: assemble_cpu<F16>(a); break;
    case DType::BFloat16: assemble_cpu<BF16>(a); break;
    default: SCRIMP_CHECK_TYPE(false, "assemble: unsupported dtype " << dtype_name(o0.dtype));
  }
}

}  // namespace scrimp
