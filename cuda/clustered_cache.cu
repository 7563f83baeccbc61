// IceCache CUDA backend: pinned mapped page pool, page gather from mapped host memory on a dedicated
// copy stream (ordered with events), split-K decode attention over a page list, nearest-centroid
// assignment (keys x centroids + argmax).
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "clustered_cache_cuda.h"
#include "cuda_check.cuh"
#include "dtype_dispatch.cuh"
#include "warp_reduce.cuh"
#include "runtime_cuda.h"
#include "scrimp/error.h"

namespace scrimp {
namespace cuda {

namespace {

// ---- page gather ------------------------------------------------------------------------------------
// Block (i, kv): copies `row_bytes` of page src[i] (keys if kv == 0, values otherwise) from mapped
// pinned host memory to row dst[i] of the store, 16 bytes per thread per iteration when aligned.
__global__ void gather_pages_kernel(const char* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst,
                                    char* k_store, char* v_store, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  const int kv = blockIdx.y;
  const char* from = pool + static_cast<int64_t>(src[i]) * page_bytes + (kv ? page_bytes / 2 : 0);
  char* to = (kv ? v_store : k_store) + static_cast<int64_t>(dst[i]) * row_bytes;
  if ((row_bytes % 16) == 0 && (reinterpret_cast<uintptr_t>(from) % 16) == 0 &&
      (reinterpret_cast<uintptr_t>(to) % 16) == 0) {
    const uint4* f = reinterpret_cast<const uint4*>(from);
    uint4* t = reinterpret_cast<uint4*>(to);
    for (int64_t j = threadIdx.x; j < row_bytes / 16; j += blockDim.x) t[j] = f[j];
  } else {
    for (int64_t j = threadIdx.x; j < row_bytes; j += blockDim.x) to[j] = from[j];
  }
}

// One dedicated copy stream per device, plus a pinned mapped buffer for the index lists.
// One copy stream per device, shared by every cache: gathers run in order on it, overlapping the
// compute stream.
struct CopyStream {
  cudaStream_t stream = nullptr;
};

std::mutex g_copy_mutex;
std::vector<CopyStream> g_copy;

cudaStream_t copy_stream(int device) {
  if (static_cast<int>(g_copy.size()) <= device) g_copy.resize(static_cast<std::size_t>(device) + 1);
  CopyStream& s = g_copy[static_cast<std::size_t>(device)];
  if (s.stream == nullptr) SCRIMP_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  return s.stream;
}

// ---- split-K decode attention over a page list ---------------------------------------------------------
constexpr int kThreads = 128;
constexpr int kMaxTile = 64;    // tokens per unit (page_size or dense chunk) on CUDA
constexpr int kMaxGroup = 16;   // query heads per KV head
constexpr int kMaxDim = 256;

struct AttnParams {
  const void* q;
  const void* k_store;
  const void* v_store;
  const int32_t* table;
  const int32_t* lens;
  const void* k_dense;
  const void* v_dense;
  const uint8_t* mask;
  const void* k_sum;      // [B, H, R, D] page summaries (optional)
  const void* v_sum;
  const float* sum_bias;  // [B, H, R], or [B, Hq, R] with bias_stride = R (one bias per query head)
  int64_t bias_stride;    // 0: one bias per row for every head of the group
  float* part;  // [B * Hq, splits, D + 2] (m, l, acc)
  int64_t B, Hq, H, G, D, ps, P, T, R, dense_units, units, splits;
  float scale;
};

template <typename T>
__global__ void paged_attention_split_kernel(AttnParams p) {
  const int64_t s = blockIdx.x;  // stream b * H + h
  const int64_t split = blockIdx.y;
  const int64_t b = s / p.H, h = s % p.H;
  const int64_t G = p.G, D = p.D;
  __shared__ float q_s[kMaxGroup * kMaxDim];
  __shared__ float sc[kMaxGroup * kMaxTile];
  __shared__ float m_s[kMaxGroup], l_s[kMaxGroup], alpha_s[kMaxGroup];
  const T* q = static_cast<const T*>(p.q);
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x)
    q_s[i] = to_float(q[(b * p.Hq + h * G) * D + i]) * p.scale;
  if (threadIdx.x < G) m_s[threadIdx.x] = -INFINITY, l_s[threadIdx.x] = 0.0f;
  // Accumulators: thread j owns (g, d) pairs j, j + blockDim, ... of G * D.
  float acc[(kMaxGroup * kMaxDim) / kThreads];
  const int n_acc = static_cast<int>((G * D + blockDim.x - 1) / blockDim.x);
  for (int i = 0; i < n_acc; ++i) acc[i] = 0.0f;
  __syncthreads();
  const int64_t u0 = p.units * split / p.splits, u1 = p.units * (split + 1) / p.splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int64_t u = u0; u < u1; ++u) {
    const T* kp;
    const T* vp;
    int64_t n;
    const uint8_t* mask = nullptr;
    const float* bias = nullptr;
    if (u < p.dense_units) {
      const int64_t t0 = u * p.ps;
      n = min(p.ps, p.T - t0);
      kp = static_cast<const T*>(p.k_dense) + (s * p.T + t0) * D;
      vp = static_cast<const T*>(p.v_dense) + (s * p.T + t0) * D;
      if (p.mask) mask = p.mask + b * p.T + t0;
    } else if (u < p.dense_units + p.P) {
      const int64_t e = s * p.P + (u - p.dense_units);
      const int32_t r = p.table[e];
      n = r < 0 ? 0 : p.lens[e];
      kp = static_cast<const T*>(p.k_store) + static_cast<int64_t>(r < 0 ? 0 : r) * p.ps * D;
      vp = static_cast<const T*>(p.v_store) + static_cast<int64_t>(r < 0 ? 0 : r) * p.ps * D;
    } else {  // a chunk of page summaries: one row per unselected page, score + log(count) bias
      const int64_t r0 = (u - p.dense_units - p.P) * p.ps;
      n = min(p.ps, p.R - r0);
      kp = p.k_sum ? static_cast<const T*>(p.k_sum) + (s * p.R + r0) * D : nullptr;  // none: bias alone
      vp = static_cast<const T*>(p.v_sum) + (s * p.R + r0) * D;
      bias = p.sum_bias + (p.bias_stride ? s * G * p.R : s * p.R) + r0;
    }
    if (n <= 0) continue;
    // Scores: one warp per (token, head) pair.
    for (int64_t w = warp; w < n * G; w += nwarps) {
      const int64_t t = w / G, g = w % G;
      float v = 0.0f;
      if (kp)
        for (int64_t d = lane; d < D; d += 32) v += q_s[g * D + d] * to_float(kp[t * D + d]);
      v = warp_sum(v);
      if (bias) v += bias[g * p.bias_stride + t];  // -inf bias: skipped
      if (lane == 0) sc[g * kMaxTile + t] = (mask && !mask[t]) ? -INFINITY : v;
    }
    __syncthreads();
    // Online softmax update per head.
    if (threadIdx.x < G) {
      const int g = threadIdx.x;
      float mx = m_s[g];
      for (int64_t t = 0; t < n; ++t) mx = fmaxf(mx, sc[g * kMaxTile + t]);
      const float alpha = (mx == -INFINITY) ? 1.0f : __expf(m_s[g] - mx);
      float l = l_s[g] * alpha;
      for (int64_t t = 0; t < n; ++t) {
        const float x = sc[g * kMaxTile + t];
        const float e = (x == -INFINITY) ? 0.0f : __expf(x - mx);
        sc[g * kMaxTile + t] = e;
        l += e;
      }
      m_s[g] = mx, l_s[g] = l, alpha_s[g] = alpha;
    }
    __syncthreads();
    for (int i = 0; i < n_acc; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (j >= G * D) break;
      const int64_t g = j / D, d = j % D;
      float a = acc[i] * alpha_s[g];
      for (int64_t t = 0; t < n; ++t) a += sc[g * kMaxTile + t] * to_float(vp[t * D + d]);
      acc[i] = a;
    }
    __syncthreads();
  }
  for (int i = 0; i < n_acc; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (j >= G * D) break;
    const int64_t g = j / D, d = j % D;
    p.part[(((b * p.Hq + h * G + g) * p.splits) + split) * (D + 2) + 2 + d] = acc[i];
  }
  if (threadIdx.x < G) {
    float* o = p.part + (((b * p.Hq + h * G + threadIdx.x) * p.splits) + split) * (D + 2);
    o[0] = m_s[threadIdx.x];
    o[1] = l_s[threadIdx.x];
  }
}

// Block per (b, hq): log-sum-exp merge of the splits.
template <typename T>
__global__ void paged_attention_combine_kernel(const float* part, int64_t splits, int64_t D, T* out) {
  const int64_t row = blockIdx.x;
  const float* pr = part + row * splits * (D + 2);
  float m = -INFINITY;
  for (int64_t j = 0; j < splits; ++j) m = fmaxf(m, pr[j * (D + 2)]);
  float l = 0.0f;
  for (int64_t j = 0; j < splits; ++j) {
    const float mj = pr[j * (D + 2)];
    if (mj != -INFINITY) l += pr[j * (D + 2) + 1] * __expf(mj - m);
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.0f;
    for (int64_t j = 0; j < splits; ++j) {
      const float mj = pr[j * (D + 2)];
      if (mj != -INFINITY) a += pr[j * (D + 2) + 2 + d] * __expf(mj - m);
    }
    out[row * D + d] = from_float<T>(l > 0.0f ? a / l : 0.0f);
  }
}

template <typename T>
void launch_attention(const PagedAttentionArgs& a, cudaStream_t stream) {
  AttnParams p{};
  p.B = a.query.shape[0];
  p.Hq = a.query.shape[1];
  p.D = a.query.shape[2];
  p.H = a.kv_heads;
  p.G = p.Hq / p.H;
  p.ps = a.k_store.shape[1];
  p.P = a.pages_per_stream;
  p.T = a.k_dense ? a.k_dense->shape[2] : 0;
  SCRIMP_CHECK(p.G <= kMaxGroup && p.D <= kMaxDim && p.ps <= kMaxTile,
               "CUDA paged attention supports up to " << kMaxGroup << " query heads per KV head, head_dim <= "
                                                      << kMaxDim << " and page_size <= " << kMaxTile);
  p.q = a.query.data;
  p.k_store = a.k_store.data;
  p.v_store = a.v_store.data;
  p.table = a.page_table.data;
  p.lens = a.page_lens.data;
  p.k_dense = a.k_dense ? a.k_dense->data : nullptr;
  p.v_dense = a.v_dense ? a.v_dense->data : nullptr;
  p.mask = a.dense_mask.data;
  p.R = a.summary_values ? a.summary_values->shape[2] : 0;
  p.k_sum = a.summary_keys ? a.summary_keys->data : nullptr;
  p.v_sum = a.summary_values ? a.summary_values->data : nullptr;
  p.sum_bias = a.summary_bias.data;
  p.bias_stride = a.summary_bias_per_query_head ? p.R : 0;
  p.scale = a.scale != 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(p.D));
  p.dense_units = (p.T + p.ps - 1) / p.ps;
  p.units = p.dense_units + p.P + (p.R + p.ps - 1) / p.ps;
  // Split-K over pages: about 4 units per block, at most 64 splits.
  p.splits = std::max<int64_t>(1, std::min<int64_t>(64, (p.units + 3) / 4));
  float* part = nullptr;
  const std::size_t bytes = static_cast<std::size_t>(p.B * p.Hq * p.splits * (p.D + 2)) * sizeof(float);
  SCRIMP_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&part), bytes, stream));
  p.part = part;
  dim3 grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(p.splits));
  paged_attention_split_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  paged_attention_combine_kernel<T><<<static_cast<unsigned>(p.B * p.Hq), 128, 0, stream>>>(
      part, p.splits, p.D, static_cast<T*>(a.out.data));
  SCRIMP_CUDA_CHECK(cudaGetLastError());
  SCRIMP_CUDA_CHECK(cudaFreeAsync(part, stream));
}

// ---- nearest centroid -----------------------------------------------------------------------------
// One warp per key row: dot with every centroid, argmax (first index on ties).
template <typename T>
__global__ void nearest_centroid_kernel(const T* keys, const T* cen, int64_t N, int64_t C, int64_t D, int32_t* out) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  float best = -INFINITY;
  int32_t arg = 0;
  for (int64_t c = 0; c < C; ++c) {
    float v = 0.0f;
    for (int64_t d = lane; d < D; d += 32) v += to_float(keys[row * D + d]) * to_float(cen[c * D + d]);
    v = warp_sum(v);
    if (v > best) best = v, arg = static_cast<int32_t>(c);
  }
  if (lane == 0) out[row] = arg;
}

}  // namespace

bool usable() {
  std::string status;
  return cuda::device_count(&status) > 0;
}

void* host_alloc_mapped(std::size_t bytes, void** device_ptr) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  if (cudaHostGetDevicePointer(device_ptr, p, 0) != cudaSuccess) {
    cudaGetLastError();
    cudaFreeHost(p);
    return nullptr;
  }
  return p;
}

void host_free(void* ptr) {
  if (ptr) cudaFreeHost(ptr);
}

// Per-cache transfer state: the page lists the gather kernel reads (pinned, mapped) and the events
// that order one cache's gathers against the compute stream.
struct Transfers {
  int device = -1;
  cudaEvent_t ready = nullptr, done = nullptr;
  int32_t* lists = nullptr;  // pinned, mapped: [2 * capacity]
  int32_t* lists_dev = nullptr;
  int64_t capacity = 0;
  bool in_flight = false;  // a gather may still read `lists`
  bool wait_owed = false;  // a gather the compute stream has not been made to wait for (a prefetch)
};

Transfers* transfers_create(int device) {
  auto t = std::make_unique<Transfers>();
  t->device = device;
  SCRIMP_CUDA_CHECK(cudaSetDevice(device));
  SCRIMP_CUDA_CHECK(cudaEventCreateWithFlags(&t->ready, cudaEventDisableTiming));
  SCRIMP_CUDA_CHECK(cudaEventCreateWithFlags(&t->done, cudaEventDisableTiming));
  return t.release();
}

void transfers_destroy(Transfers* t) {
  if (t == nullptr) return;
  cudaSetDevice(t->device);
  if (t->in_flight) cudaEventSynchronize(t->done);  // the kernel may still read the lists
  if (t->lists) cudaFreeHost(t->lists);
  if (t->ready) cudaEventDestroy(t->ready);
  if (t->done) cudaEventDestroy(t->done);
  cudaGetLastError();
  delete t;
}

void gather_pages(Transfers* t, const void* pool_device_base, int64_t page_bytes, const int32_t* src,
                  const int32_t* dst, int64_t n, void* k_store, void* v_store, int64_t row_bytes, void* stream,
                  bool wait) {
  if (n == 0) return;
  SCRIMP_CUDA_CHECK(cudaSetDevice(t->device));
  // The lists are rewritten below: wait for this cache's previous gather to have read them.
  if (t->in_flight) SCRIMP_CUDA_CHECK(cudaEventSynchronize(t->done));
  t->in_flight = false;
  if (n > t->capacity) {
    if (t->lists) cudaFreeHost(t->lists);
    t->lists = nullptr;
    t->capacity = 0;
    void* dev = nullptr;
    t->lists = static_cast<int32_t*>(host_alloc_mapped(static_cast<std::size_t>(2 * n) * sizeof(int32_t), &dev));
    if (!t->lists) SCRIMP_FAIL("gather_pages: pinned allocation of the page lists failed");
    t->lists_dev = static_cast<int32_t*>(dev);
    t->capacity = n;
  }
  std::memcpy(t->lists, src, static_cast<std::size_t>(n) * sizeof(int32_t));
  std::memcpy(t->lists + t->capacity, dst, static_cast<std::size_t>(n) * sizeof(int32_t));
  cudaStream_t compute = static_cast<cudaStream_t>(stream);
  std::lock_guard<std::mutex> lock(g_copy_mutex);
  cudaStream_t copy = copy_stream(t->device);
  // The copy may overwrite slots that earlier attention on the compute stream still reads.
  SCRIMP_CUDA_CHECK(cudaEventRecord(t->ready, compute));
  SCRIMP_CUDA_CHECK(cudaStreamWaitEvent(copy, t->ready, 0));
  dim3 grid(static_cast<unsigned>(n), 2);
  gather_pages_kernel<<<grid, 256, 0, copy>>>(static_cast<const char*>(pool_device_base), page_bytes, t->lists_dev,
                                              t->lists_dev + t->capacity, static_cast<char*>(k_store),
                                              static_cast<char*>(v_store), row_bytes);
  SCRIMP_CUDA_CHECK(cudaGetLastError());
  SCRIMP_CUDA_CHECK(cudaEventRecord(t->done, copy));
  t->in_flight = true;
  t->wait_owed = true;
  // Only the work queued after this call on `compute` (this layer's attention) waits for its pages;
  // a prefetch (wait = false) leaves the wait to wait_transfers, just before the attention that reads them.
  if (wait) wait_transfers(t, stream);
}

void wait_transfers(Transfers* t, void* stream) {
  if (t == nullptr || !t->wait_owed) return;
  SCRIMP_CUDA_CHECK(cudaSetDevice(t->device));
  SCRIMP_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), t->done, 0));
  t->wait_owed = false;
}

void paged_decode_attention(const PagedAttentionArgs& a) {
  SCRIMP_CUDA_CHECK(cudaSetDevice(a.query.device.index));
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  dispatch_float(a.query.dtype, "paged_decode_attention",
                 [&](auto tag) { launch_attention<typename decltype(tag)::type>(a, stream); });
}

void nearest_centroid(const TensorView& keys, const TensorView& centroids, int32_t* out, void* stream) {
  SCRIMP_CUDA_CHECK(cudaSetDevice(keys.device.index));
  const int64_t N = keys.shape[0], C = centroids.shape[0], D = keys.shape[1];
#if defined(SCRIMP_WITH_CUTLASS)
  if (nearest_centroid_mma(keys, centroids, out, stream)) return;  // fp16 / bf16 on tensor cores
#endif
  const unsigned blocks = static_cast<unsigned>((N * 32 + 255) / 256);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_float(keys.dtype, "nearest_centroid", [&](auto tag) {
    using T = typename decltype(tag)::type;
    nearest_centroid_kernel<T><<<blocks, 256, 0, s>>>(static_cast<const T*>(keys.data),
                                                      static_cast<const T*>(centroids.data), N, C, D, out);
  });
  SCRIMP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace scrimp
