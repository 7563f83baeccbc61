// The CUDA backend's one dtype helper: element conversions (to_float / from_float, round to nearest
// even) for float, __half and __nv_bfloat16, and dispatch_float() that turns a runtime DType into a
// compile-time element type for a launcher. Every cuda/*.cu converts and dispatches through here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

#include "scrimp/error.h"
#include "scrimp/tensor.h"

namespace scrimp {
namespace cuda {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T = float, __half or __nv_bfloat16 for dt; any other dtype is a TypeError
// naming `what`.
template <typename F>
void dispatch_float(DType dt, const char* what, F&& f) {
  switch (dt) {
    case DType::Float32: std::forward<F>(f)(Tag<float>{}); return;
    case DType::Float16: std::forward<F>(f)(Tag<__half>{}); return;
    case DType::BFloat16: std::forward<F>(f)(Tag<__nv_bfloat16>{}); return;
    default: break;
  }
  SCRIMP_CHECK_TYPE(false, what << " on CUDA: expected float32, float16 or bfloat16, got " << dtype_name(dt));
}

}  // namespace cuda
}  // namespace scrimp
