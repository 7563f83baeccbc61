// CUDA backend of scrimp::kl_loss (arguments validated by cpp/src/kl_loss.cpp).
//
// One 256-thread block per row (grid-stride over rows). The math mirrors cpp/src/kl_loss_kernel.inc:
//   pass 1: each thread keeps an online (max, sum of exps) pair per model over its strided
//           elements; the block combines the pairs -> lse_s, lse_t;
//   pass 2: per-thread loss sums with x = (s/T - max_s) - log Z_s = log p, y likewise, block-reduced;
//   pass 3: the gradient, written in the logits' dtype (the forward KL writes it in pass 2).
// Terms with p = 0 (q = 0 for teacher sums) are skipped so -inf entries contribute exactly 0.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_check.cuh"
#include "dtype_dispatch.cuh"
#include "warp_reduce.cuh"
#include "kl_loss_cuda.h"
#include "scrimp/error.h"


namespace scrimp {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLead = 8;

struct KLParams {
  const char* student;
  const char* teacher;
  float* loss;
  char* grad;
  int64_t rows, vocab;
  int nlead;
  int64_t lead[kMaxLead], sstride[kMaxLead], tstride[kMaxLead];
  float inv_t, beta, log_beta, log_1mbeta, factor;
};

__device__ __forceinline__ int64_t row_offset(int64_t row, const KLParams& p, const int64_t* strides) {
  int64_t off = 0;
  for (int d = p.nlead - 1; d >= 0; --d) {
    off += (row % p.lead[d]) * strides[d];
    row /= p.lead[d];
  }
  return off;
}

// (max, sum e^{x - max}) pairs; max = -inf means "empty".
__device__ __forceinline__ void lse_combine(float& m, float& z, float m2, float z2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    z = z2;
    return;
  }
  const float M = fmaxf(m, m2);
  z = z * expf(m - M) + z2 * expf(m2 - M);
  m = M;
}

__device__ __forceinline__ void lse_add(float& m, float& z, float x) {
  if (x == -INFINITY) return;
  if (x > m) {
    z = (m == -INFINITY ? 0.f : z * expf(m - x)) + 1.f;
    m = x;
  } else {
    z += expf(x - m);
  }
}

// Block-wide reductions through shared memory (every thread gets the result).
__device__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) r += sh[w];
  return r;
}

__device__ void block_lse(float& m, float& z, float* shm, float* shz) {
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), z2 = __shfl_xor_sync(0xffffffffu, z, o);
    lse_combine(m, z, m2, z2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    shm[warp] = m;
    shz[warp] = z;
  }
  __syncthreads();
  m = -INFINITY;
  z = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) lse_combine(m, z, shm[w], shz[w]);
}

__device__ __forceinline__ float log_mixture(float x, float y, const KLParams& p) {
  const float a = y + p.log_beta, b = x + p.log_1mbeta;
  const float mx = fmaxf(a, b), mn = fminf(a, b);
  return mx + log1pf(expf(mn - mx));
}

template <typename T, int K, bool kGrad>  // K: 0 reverse, 1 forward, 2 jsd
__global__ void __launch_bounds__(kThreads) kl_rows_kernel(KLParams p) {
  __shared__ float sh_a[kThreads / 32], sh_b[kThreads / 32];
  const int64_t V = p.vocab;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* s = reinterpret_cast<const T*>(p.student) + row_offset(row, p, p.sstride);
    const T* t = reinterpret_cast<const T*>(p.teacher) + row_offset(row, p, p.tstride);
    T* g = kGrad ? reinterpret_cast<T*>(p.grad) + row * V : nullptr;

    // pass 1
    float ms = -INFINITY, zs = 0.f, mt = -INFINITY, zt = 0.f;
    float nan_flag = 0.f;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float xs = to_float(s[j]) * p.inv_t, xt = to_float(t[j]) * p.inv_t;
      if (isnan(xs) || isnan(xt)) nan_flag = 1.f;
      lse_add(ms, zs, xs);
      lse_add(mt, zt, xt);
    }
    block_lse(ms, zs, sh_a, sh_b);
    block_lse(mt, zt, sh_a, sh_b);
    nan_flag = block_sum(nan_flag, sh_a);
    // log p = (s - ms) - log zs, never s - lse_s: ms (a row maximum) cancels s exactly, while lse_s
    // rounded to float would put half an ulp of |s| into every log p (see kl_loss_kernel.inc)
    const float lzs = logf(zs), lzt = logf(zt);
    const float lse_s = ms + lzs, lse_t = mt + lzt;
    if (nan_flag > 0.f || !isfinite(lse_s) || !isfinite(lse_t)) {
      if (threadIdx.x == 0) p.loss[row] = NAN;
      if (kGrad)
        for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = from_float<T>(NAN);
      continue;
    }

    // pass 2
    float acc_a = 0.f, acc_b = 0.f;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float x = (to_float(s[j]) * p.inv_t - ms) - lzs, y = (to_float(t[j]) * p.inv_t - mt) - lzt;
      const float pp = expf(x), q = expf(y);
      if (K == 0) {
        if (pp > 0.f) acc_a += pp * (x - y);
      } else if (K == 1) {
        if (q > 0.f) acc_a += q * (y - x);
        if (kGrad) g[j] = from_float<T>((pp - q) * p.factor);
      } else {
        const float lm = log_mixture(x, y, p);
        if (q > 0.f) acc_a += q * (y - lm);
        if (pp > 0.f) acc_b += pp * (x - lm);
      }
    }
    acc_a = block_sum(acc_a, sh_a);
    if (K == 2) acc_b = block_sum(acc_b, sh_b);
    if (threadIdx.x == 0) p.loss[row] = K == 2 ? p.beta * acc_a + (1.f - p.beta) * acc_b : acc_a;

    // pass 3
    if (kGrad && K != 1) {
      const float center = K == 2 ? acc_b : acc_a;
      const float scale = K == 2 ? p.factor * (1.f - p.beta) : p.factor;
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        const float x = (to_float(s[j]) * p.inv_t - ms) - lzs, y = (to_float(t[j]) * p.inv_t - mt) - lzt;
        const float pp = expf(x);
        const float z = K == 2 ? log_mixture(x, y, p) : y;
        g[j] = from_float<T>(pp > 0.f ? pp * (x - z - center) * scale : 0.f);
      }
    }
    __syncthreads();  // shared buffers are reused by the next row
  }
}

template <typename T, int K>
void launch(const KLParams& p, bool grad, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.rows < 65535 ? p.rows : 65535);
  if (grad) kl_rows_kernel<T, K, true><<<grid, kThreads, 0, stream>>>(p);
  else kl_rows_kernel<T, K, false><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_kind(const KLParams& p, KLKind kind, bool grad, cudaStream_t stream) {
  switch (kind) {
    case KLKind::Reverse: launch<T, 0>(p, grad, stream); break;
    case KLKind::Forward: launch<T, 1>(p, grad, stream); break;
    case KLKind::JSD: launch<T, 2>(p, grad, stream); break;
  }
}

}  // namespace

void kl_loss(const KLLossArgs& args, KLKind kind) {
  const TensorView& s = args.student;
  const TensorView& t = args.teacher;
  const int nlead = static_cast<int>(s.shape.size()) - 1;
  SCRIMP_CHECK(nlead <= kMaxLead, "kl_loss (CUDA): at most " << kMaxLead << " leading dimensions, got " << nlead);
  KLParams p{};
  p.student = static_cast<const char*>(s.data);
  p.teacher = static_cast<const char*>(t.data);
  p.loss = args.loss.data;
  p.grad = args.grad ? static_cast<char*>(args.grad->data) : nullptr;
  p.vocab = s.shape.back();
  p.rows = s.numel() / p.vocab;
  p.nlead = nlead;
  for (int d = 0; d < nlead; ++d) {
    p.lead[d] = s.shape[d];
    p.sstride[d] = s.strides[d];
    p.tstride[d] = t.strides[d];
  }
  p.inv_t = 1.0f / args.temperature;
  p.beta = args.beta;
  p.log_beta = std::log(args.beta);
  p.log_1mbeta = std::log1p(-args.beta);
  p.factor = args.grad_scale / args.temperature;
  int prev = 0;
  SCRIMP_CUDA_CHECK(cudaGetDevice(&prev));
  if (prev != s.device.index) SCRIMP_CUDA_CHECK(cudaSetDevice(s.device.index));
  cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
  const bool grad = args.grad != nullptr;
  dispatch_float(s.dtype, "kl_loss", [&](auto tag) { launch_kind<typename decltype(tag)::type>(p, kind, grad, stream); });
  const cudaError_t err = cudaGetLastError();
  if (prev != s.device.index) cudaSetDevice(prev);
  SCRIMP_CUDA_CHECK(err);
}

}  // namespace cuda
}  // namespace scrimp
