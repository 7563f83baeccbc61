// CUDA backend of scrimp::token_scores: argument packing, split planning and launches.
// The kernels are in scoring.cuh; the arguments were validated by cpp/src/scoring.cpp.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "cuda_check.cuh"
#include "dtype_dispatch.cuh"
#include "scoring_cuda.h"
#include "scoring.cuh"
#include "scrimp/error.h"
#include "scrimp/scoring.h"


namespace scrimp {
namespace cuda {

namespace {

using kern::Params;

// Makes `device` current for the scope of a call and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SCRIMP_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      SCRIMP_CUDA_CHECK(cudaSetDevice(device));
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(prev_);  // best effort: never throw from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

// Per-device facts and a private memory pool for split-row scratch (kept, never trimmed: the
// scratch is at most a few hundred KB).
struct DeviceInfo {
  bool ready = false;
  int sm_count = 1;
  bool pools = false;
  cudaMemPool_t pool = nullptr;
};

DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static std::vector<DeviceInfo> infos;
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(infos.size()) <= device) infos.resize(device + 1);
  DeviceInfo& d = infos[device];
  if (!d.ready) {
    SCRIMP_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
    int pools = 0;
    SCRIMP_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
    if (pools) {
      cudaMemPoolProps props = {};
      props.allocType = cudaMemAllocationTypePinned;
      props.handleTypes = cudaMemHandleTypeNone;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      SCRIMP_CUDA_CHECK(cudaMemPoolCreate(&d.pool, &props));
      uint64_t keep = UINT64_MAX;
      SCRIMP_CUDA_CHECK(cudaMemPoolSetAttribute(d.pool, cudaMemPoolAttrReleaseThreshold, &keep));
      d.pools = true;
    }
    d.ready = true;
  }
  return d;
}

// Stream-ordered scratch: the private pool normally; cudaMallocAsync (the device's default pool,
// which graph capture supports) while the stream is being captured.
class Scratch {
 public:
  Scratch(const DeviceInfo& info, std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    SCRIMP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture == cudaStreamCaptureStatusNone) {
      SCRIMP_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr_, bytes, info.pool, stream));
    } else {
      SCRIMP_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
    }
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);  // stream-ordered: after the kernels that use it
  }
  void* get() const { return ptr_; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Collapses the leading dims: drops size-1 dims and merges d into d+1 when every tensor's stride
// says they are one dim (stride[d] == stride[d+1] * shape[d+1]).
void collapse_leading(const TokenScoresArgs& a, Params& p) {
  const TensorView& s = a.student;
  const std::size_t nd = s.shape.size() - 1;
  std::vector<int64_t> shape, ss, ts, gs;
  for (std::size_t d = 0; d < nd; ++d) {
    if (s.shape[d] == 1) continue;
    const int64_t sst = s.strides[d];
    const int64_t tst = a.teacher ? a.teacher->strides[d] : 0;
    const int64_t gst = a.targets ? a.targets->strides[d] : 0;
    if (!shape.empty()) {
      const int64_t n = s.shape[d];
      if (ss.back() == sst * n && ts.back() == tst * n && gs.back() == gst * n) {
        shape.back() *= n;
        ss.back() = sst;
        ts.back() = tst;
        gs.back() = gst;
        continue;
      }
    }
    shape.push_back(s.shape[d]);
    ss.push_back(sst);
    ts.push_back(tst);
    gs.push_back(gst);
  }
  if (shape.empty()) {  // a single row
    shape.push_back(1);
    ss.push_back(0);
    ts.push_back(0);
    gs.push_back(0);
  }
  SCRIMP_CHECK(shape.size() <= static_cast<std::size_t>(kern::kMaxLeadDims),
               "token_scores on CUDA supports at most " << kern::kMaxLeadDims
                                                        << " non-mergeable leading dimensions, got "
                                                        << shape.size() << " for " << describe(s)
                                                        << "; make the logits contiguous first");
  p.ndim = static_cast<int>(shape.size());
  for (int d = 0; d < kern::kMaxLeadDims; ++d) {
    const bool in = d < p.ndim;
    p.shape[d] = in ? shape[d] : 1;
    p.s_stride[d] = in ? ss[d] : 0;
    p.t_stride[d] = in ? ts[d] : 0;
    p.g_stride[d] = in ? gs[d] : 0;
  }
}

template <typename T, bool kTeacher>
void launch(const Params& p0, const DeviceInfo& info, cudaStream_t stream) {
  using Tr = kern::Traits<T>;
  Params p = p0;
  const int64_t nvec = p.vocab / Tr::kVec;  // vectors per row (per model), about
  // Short rows: one warp per row, eight rows per block; long rows: one block per row.
  const bool warp_rows = nvec <= 32 * kern::kUnroll * 4;
  const int row_threads = warp_rows ? 32 : kern::kBlockThreads;
  const int groups = kern::kBlockThreads / row_threads;

  // Split long rows into slices when there are too few rows to give every SM a few blocks; a
  // slice is at least one full tile per thread.
  const int64_t slots = static_cast<int64_t>(info.sm_count) * 4;  // __launch_bounds__(256, 4)
  const int64_t blocks = (p.rows + groups - 1) / groups;
  int64_t split = 1;
  if (info.pools && blocks < 2 * slots) {
    const int64_t max_split = nvec / (static_cast<int64_t>(row_threads) * kern::kUnroll);
    split = (2 * slots + blocks - 1) / blocks;
    if (split > max_split) split = max_split;
    if (split > 1024) split = 1024;
    if (split < 1) split = 1;
  }
  SCRIMP_CHECK(blocks <= 0x7fffffffLL, "token_scores on CUDA: too many rows (" << p.rows << ")");
  p.split = static_cast<int>(split);

  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(split));
  auto run = [&]() {
    if (warp_rows)
      kern::score_rows_kernel<T, kTeacher, 32><<<grid, kern::kBlockThreads, 0, stream>>>(p);
    else
      kern::score_rows_kernel<T, kTeacher, kern::kBlockThreads><<<grid, kern::kBlockThreads, 0, stream>>>(p);
    SCRIMP_CUDA_CHECK(cudaGetLastError());
  };
  if (split == 1) {
    run();
    return;
  }
  Scratch scratch(info, static_cast<std::size_t>(p.rows) * split * 2 * sizeof(float4), stream);
  p.partials = static_cast<float4*>(scratch.get());
  run();
  const int64_t fin_blocks = (p.rows + kern::kBlockThreads / 32 - 1) / (kern::kBlockThreads / 32);
  kern::score_finalize_kernel<T, kTeacher><<<static_cast<unsigned>(fin_blocks), kern::kBlockThreads, 0, stream>>>(p);
  SCRIMP_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_dtype(const Params& p, bool teacher, const DeviceInfo& info, cudaStream_t stream) {
  if (teacher)
    launch<T, true>(p, info, stream);
  else
    launch<T, false>(p, info, stream);
}

}  // namespace

void token_scores(const TokenScoresArgs& args) {
  const TensorView& s = args.student;
  const int64_t V = s.shape.back();
  const int64_t rows = V > 0 ? s.numel() / V : 0;
  if (rows == 0 || V == 0) return;
  SCRIMP_CHECK(s.device.type == DeviceType::CUDA, "cuda::token_scores: expected CUDA tensors, got " << describe(s));
  const std::size_t esize = dtype_size(s.dtype);
  SCRIMP_CHECK(reinterpret_cast<uintptr_t>(s.data) % esize == 0,
               "student_logits: data pointer is not aligned to its element size");
  SCRIMP_CHECK(!args.teacher || reinterpret_cast<uintptr_t>(args.teacher->data) % esize == 0,
               "teacher_logits: data pointer is not aligned to its element size");

  DeviceGuard guard(s.device.index);
  const DeviceInfo& info = device_info(s.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(args.stream);

  Params p;
  p.student = static_cast<const char*>(s.data);
  p.teacher = args.teacher ? static_cast<const char*>(args.teacher->data) : nullptr;
  p.targets = args.targets ? static_cast<const int64_t*>(args.targets->data) : nullptr;
  p.student_entropy = args.student_entropy.data;
  p.teacher_entropy = args.teacher ? args.teacher_entropy.data : nullptr;
  p.kl_forward = args.teacher ? args.kl_forward.data : nullptr;
  p.kl_reverse = args.teacher ? args.kl_reverse.data : nullptr;
  p.student_logprob = args.targets ? args.student_logprob.data : nullptr;
  p.teacher_logprob = args.targets && args.teacher ? args.teacher_logprob.data : nullptr;
  p.rows = rows;
  p.vocab = V;
  p.c = static_cast<float>(1.4426950408889634074 / static_cast<double>(args.temperature));
  SCRIMP_CHECK(p.c > 0.0f && std::isfinite(p.c),
               "temperature " << args.temperature << " is outside the range the CUDA kernel supports");
  collapse_leading(args, p);

  dispatch_float(s.dtype, "token_scores", [&](auto tag) {
    launch_dtype<typename decltype(tag)::type>(p, args.teacher != nullptr, info, stream);
  });
}

}  // namespace cuda
}  // namespace scrimp
