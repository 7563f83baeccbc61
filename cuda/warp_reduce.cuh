// Warp-level reductions shared by the CUDA kernels (every lane of the warp gets the result).
#pragma once
#include <cuda_runtime.h>

namespace scrimp {
namespace cuda {

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda
}  // namespace scrimp
