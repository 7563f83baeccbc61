// Nearest centroid on tensor cores (CUTLASS / CuTe), for IceCache's prefill clustering:
//   out[n] = argmax_c keys[n] . centroids[c]          keys [N, D], centroids [C, D], fp16 / bf16
// The product is a GEMM (keys x centroids^T) on SM80 mma.sync atoms (fp32 accumulation; also what
// sm_90 runs); the argmax is fused into its epilogue: each 64 x 64 score tile stays in registers, every
// thread folds its accumulators into a per-row running best in shared memory (one 64-bit atomicMax on
// an order-preserving packing of (score, -centroid)), so scores never reach global memory and ties go
// to the lowest centroid index, like the CPU kernel.
// Only compiled with SCRIMP_WITH_CUTLASS (headers from the nvidia-cutlass wheel); without them
// nearest_centroid() uses the plain kernel in clustered_cache.cu.
#if defined(SCRIMP_WITH_CUTLASS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include <cute/tensor.hpp>

#include "clustered_cache_cuda.h"
#include "cuda_check.cuh"
#include "dtype_dispatch.cuh"
#include "scrimp/error.h"

namespace scrimp {
namespace cuda {

namespace {

using namespace cute;

constexpr int kBM = 64;   // keys per block
constexpr int kBN = 64;   // centroids per epilogue tile
constexpr int kBK = 32;   // head-dim slice per main-loop step (D is zero-padded to a multiple)
constexpr int kThreads = 128;  // 2 x 2 warps of 16 x 8 x 16 atoms

// Order-preserving map of a float to uint32 (larger float -> larger integer; -inf lowest but NaN).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (score, centroid) packed so that the max is the best score and, among equal scores, the lowest c.
__device__ __forceinline__ unsigned long long pack(float score, int c) {
  return (static_cast<unsigned long long>(ordered_bits(score)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(c));
}

template <typename T, typename MmaAtom>
__global__ void __launch_bounds__(kThreads)
nearest_centroid_mma_kernel(const T* __restrict__ keys, const T* __restrict__ cen, int N, int C, int D,
                            int32_t* __restrict__ out) {
  __shared__ T smem_a[kBM * kBK];
  __shared__ T smem_b[kBN * kBK];
  __shared__ unsigned long long best[kBM];
  const int m0 = blockIdx.x * kBM;
  for (int i = threadIdx.x; i < kBM; i += kThreads) best[i] = 0ull;

  // K-major tiles: sA [BM, BK] of keys, sB [BN, BK] of centroids (both D-contiguous: the "TN" GEMM).
  Tensor sA = make_tensor(make_smem_ptr(smem_a), make_layout(make_shape(Int<kBM>{}, Int<kBK>{}), LayoutRight{}));
  Tensor sB = make_tensor(make_smem_ptr(smem_b), make_layout(make_shape(Int<kBN>{}, Int<kBK>{}), LayoutRight{}));
  auto tiled_mma = make_tiled_mma(MmaAtom{}, Layout<Shape<_2, _2, _1>>{});
  auto thr_mma = tiled_mma.get_slice(threadIdx.x);
  Tensor tCsA = thr_mma.partition_A(sA);
  Tensor tCsB = thr_mma.partition_B(sB);
  Tensor tCrA = thr_mma.make_fragment_A(tCsA);
  Tensor tCrB = thr_mma.make_fragment_B(tCsB);
  // (row, col) of each accumulator this thread holds, for the epilogue
  Tensor cC = make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor tCcC = thr_mma.partition_C(cC);
  Tensor acc = partition_fragment_C(tiled_mma, make_shape(Int<kBM>{}, Int<kBN>{}));

  const T zero = T(0.0f);
  for (int n0 = 0; n0 < C; n0 += kBN) {
    clear(acc);
    for (int k0 = 0; k0 < D; k0 += kBK) {
      __syncthreads();  // the previous step's fragments were read from these tiles
      for (int i = threadIdx.x; i < kBM * kBK; i += kThreads) {
        const int r = i / kBK, k = k0 + i % kBK;
        smem_a[i] = (m0 + r < N && k < D) ? keys[static_cast<int64_t>(m0 + r) * D + k] : zero;
      }
      for (int i = threadIdx.x; i < kBN * kBK; i += kThreads) {
        const int r = i / kBK, k = k0 + i % kBK;
        smem_b[i] = (n0 + r < C && k < D) ? cen[static_cast<int64_t>(n0 + r) * D + k] : zero;
      }
      __syncthreads();
      copy(tCsA, tCrA);
      copy(tCsB, tCrB);
      gemm(tiled_mma, tCrA, tCrB, acc);
    }
    // epilogue: fold this tile's scores into the per-row best, straight from the accumulators
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int r = get<0>(tCcC(i)), c = n0 + get<1>(tCcC(i));
      if (m0 + r < N && c < C) atomicMax(&best[r], pack(acc(i), c));
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < kBM; r += kThreads)
    if (m0 + r < N) out[m0 + r] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(best[r] & 0xFFFFFFFFull));
}

}  // namespace

bool nearest_centroid_mma(const TensorView& keys, const TensorView& centroids, int32_t* out, void* stream) {
  const int64_t N = keys.shape[0], C = centroids.shape[0], D = keys.shape[1];
  if (N > (int64_t{1} << 30) || C > (int64_t{1} << 30) || D > 4096) return false;  // int indexing above
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((N + kBM - 1) / kBM);
  if (keys.dtype == DType::Float32) return false;  // float32: the plain kernel (exact fp32 products)
  dispatch_float(keys.dtype, "nearest_centroid", [&](auto tag) {
    using T = typename decltype(tag)::type;  // __half or __nv_bfloat16; CuTe's half_t / bfloat16_t share the layout
    using CuteT = std::conditional_t<std::is_same<T, __half>::value, half_t, bfloat16_t>;
    using Atom = std::conditional_t<std::is_same<T, __half>::value, SM80_16x8x16_F32F16F16F32_TN,
                                    SM80_16x8x16_F32BF16BF16F32_TN>;
    nearest_centroid_mma_kernel<CuteT, Atom><<<blocks, kThreads, 0, s>>>(
        static_cast<const CuteT*>(keys.data), static_cast<const CuteT*>(centroids.data), static_cast<int>(N),
        static_cast<int>(C), static_cast<int>(D), out);
  });
  SCRIMP_CUDA_CHECK(cudaGetLastError());
  return true;
}

}  // namespace cuda
}  // namespace scrimp
#endif  // SCRIMP_WITH_CUTLASS
