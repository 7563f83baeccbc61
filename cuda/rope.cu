// CUDA backend of RoPE re-rotation and packet assembly (cpp/include/scrimp/rope.h).
// One thread block per group of rows, one thread per rotary pair; angles for a scalar delta are
// computed once on the host (float64) and passed by value, per-position deltas in float64 on device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_check.cuh"
#include "dtype_dispatch.cuh"
#include "rope_cuda.h"
#include "scrimp/error.h"

namespace scrimp {
namespace cuda {

namespace {

constexpr int kMaxPairs = 256;  // head_dim <= 512

struct CosSin {
  float cs[2 * kMaxPairs];
};
struct InvFreq {
  double f[kMaxPairs];
};


// Row r of `rows` = (b, h, s) with S innermost; strides in elements.
template <typename T>
__global__ void rerotate_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t H, int64_t S,
                                int64_t D, int64_t is0, int64_t is1, int64_t is2, int64_t os0, int64_t os1,
                                int64_t os2, int pairs, int interleaved, CosSin cs, const int64_t* delta_pos,
                                int64_t dstride, InvFreq inv) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.y + threadIdx.y;
  if (r >= rows) return;
  const int64_t s = r % S, h = (r / S) % H, b = r / (S * H);
  const T* src = in + b * is0 + h * is1 + s * is2;
  T* dst = out + b * os0 + h * os1 + s * os2;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    float c, sn;
    if (delta_pos) {
      const double a = (double)delta_pos[s * dstride] * inv.f[i];
      c = (float)cos(a);
      sn = (float)sin(a);
    } else {
      c = cs.cs[2 * i];
      sn = cs.cs[2 * i + 1];
    }
    const int64_t ix = interleaved ? 2 * i : i, iy = interleaved ? 2 * i + 1 : i + pairs;
    const float x = to_float(src[ix]), y = to_float(src[iy]);
    dst[ix] = from_float<T>(x * c - y * sn);
    dst[iy] = from_float<T>(y * c + x * sn);
  }
  if (dst != src)
    for (int64_t i = 2 * pairs + threadIdx.x; i < D; i += blockDim.x) dst[i] = src[i];
}

CosSin make_cs(int64_t delta, const std::vector<double>& inv_freq) {
  CosSin cs{};
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double a = (double)delta * inv_freq[i];
    cs.cs[2 * i] = (float)std::cos(a);
    cs.cs[2 * i + 1] = (float)std::sin(a);
  }
  return cs;
}

template <typename T>
void launch_rotate(const T* in, T* out, int64_t B, int64_t H, int64_t S, int64_t D, const int64_t* is, const int64_t* os,
                   const std::vector<double>& inv_freq, RopeLayout layout, int64_t delta, const int64_t* delta_pos,
                   int64_t dstride, cudaStream_t stream) {
  const int pairs = (int)inv_freq.size();
  SCRIMP_CHECK(pairs <= kMaxPairs, "CUDA re-rotation supports head_dim <= " << 2 * kMaxPairs);
  InvFreq inv{};
  for (int i = 0; i < pairs; ++i) inv.f[i] = inv_freq[i];
  const CosSin cs = make_cs(delta, inv_freq);
  int tx = 32;
  while (tx < pairs && tx < 128) tx *= 2;
  const int ty = 256 / tx;
  const int64_t rows = B * H * S;
  const dim3 block(tx, ty);
  const dim3 grid((unsigned)((rows + ty - 1) / ty));
  rerotate_kernel<T><<<grid, block, 0, stream>>>(in, out, rows, H, S, D, is[0], is[1], is[2], os[0], os[1], os[2], pairs,
                                                 layout == RopeLayout::Interleaved, cs, delta_pos, dstride, inv);
  SCRIMP_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void rerotate_typed(const RerotateArgs& a) {
  const auto& k = a.keys;
  const int64_t* dp = a.delta_per_pos ? static_cast<const int64_t*>(a.delta_per_pos->data) : nullptr;
  launch_rotate<T>(static_cast<const T*>(k.data), static_cast<T*>(a.out.data), k.shape[0], k.shape[1], k.shape[2],
                   k.shape[3], k.strides.data(), a.out.strides.data(), a.inv_freq, a.layout, a.delta, dp,
                   a.delta_per_pos ? a.delta_per_pos->strides[0] : 0, static_cast<cudaStream_t>(a.stream));
}

template <typename T>
void assemble_typed(const AssembleArgs& a) {
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  int64_t pos = a.seq_offset;
  const size_t esz = sizeof(T);
  for (const AssemblePart& part : a.parts) {
    const int64_t H = part.keys[0].shape[0], T_ = part.keys[0].shape[1], D = part.keys[0].shape[2];
    for (size_t l = 0; l < a.out_keys.size(); ++l) {
      const TensorView& ok = a.out_keys[l];
      const TensorView& ov = a.out_values[l];
      const int64_t is[3] = {0, T_ * D, D};
      const int64_t os[3] = {0, ok.strides[1], ok.strides[2]};
      launch_rotate<T>(static_cast<const T*>(part.keys[l].data), static_cast<T*>(ok.data) + pos * ok.strides[2], 1, H,
                       T_, D, is, os, part.inv_freq, part.layout, part.delta, nullptr, 0, stream);
      // V: H planes of T rows; copy each head's rows (pitch = out token stride).
      for (int64_t h = 0; h < H; ++h)
        SCRIMP_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<T*>(ov.data) + h * ov.strides[1] + pos * ov.strides[2],
                                            ov.strides[2] * esz, static_cast<const T*>(part.values[l].data) + h * T_ * D,
                                            D * esz, D * esz, T_, cudaMemcpyDeviceToDevice, stream));
    }
    pos += T_;
  }
}

}  // namespace

void rerotate_keys(const RerotateArgs& a) {
  dispatch_float(a.keys.dtype, "rerotate_keys", [&](auto tag) { rerotate_typed<typename decltype(tag)::type>(a); });
}

void assemble_kv(const AssembleArgs& a) {
  dispatch_float(a.out_keys[0].dtype, "assemble", [&](auto tag) { assemble_typed<typename decltype(tag)::type>(a); });
}

}  // namespace cuda
}  // namespace scrimp
