// Owned buffers of the packet store tiers and byte copies across host / CUDA memory.
#include <cstdlib>
#include <cstring>
#include <new>

#include "packet_store_internal.h"
#include "scrimp/error.h"

#if defined(SCRIMP_WITH_CUDA)
#include <cuda_runtime.h>
#define SCRIMP_CUDA_OK(call, what)                                                        \
  do {                                                                                    \
    cudaError_t scrimp_e_ = (call);                                                       \
    if (scrimp_e_ != cudaSuccess) SCRIMP_FAIL(what << ": " << cudaGetErrorString(scrimp_e_)); \
  } while (0)
#endif

namespace scrimp {
namespace detail {

Buffer::~Buffer() {
  if (!ptr) return;
  switch (kind) {
    case Kind::Aligned: std::free(ptr); break;
#if defined(SCRIMP_WITH_CUDA)
    case Kind::Pinned: cudaFreeHost(ptr); break;
    case Kind::Device: {
      int prev = 0;
      cudaGetDevice(&prev);
      cudaSetDevice(device);
      cudaFree(ptr);
      cudaSetDevice(prev);
      break;
    }
#else
    default: break;
#endif
  }
}

int cuda_devices() {
#if defined(SCRIMP_WITH_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

std::shared_ptr<Buffer> alloc_host(uint64_t bytes, bool pinned) {
  auto b = std::make_shared<Buffer>();
  b->bytes = bytes;
  const uint64_t n = bytes ? bytes : 1;
#if defined(SCRIMP_WITH_CUDA)
  if (pinned) {
    b->kind = Buffer::Kind::Pinned;
    SCRIMP_CUDA_OK(cudaHostAlloc(&b->ptr, n, cudaHostAllocDefault), "cudaHostAlloc of " << n << " bytes");
    return b;
  }
#else
  (void)pinned;
#endif
  b->kind = Buffer::Kind::Aligned;
  b->ptr = std::aligned_alloc(64, (n + 63) / 64 * 64);
  if (!b->ptr) SCRIMP_FAIL("out of host memory allocating " << n << " bytes");
  return b;
}

std::shared_ptr<Buffer> alloc_device(uint64_t bytes, int device) {
#if defined(SCRIMP_WITH_CUDA)
  auto b = std::make_shared<Buffer>();
  b->bytes = bytes;
  b->kind = Buffer::Kind::Device;
  b->device = device;
  int prev = 0;
  cudaGetDevice(&prev);
  SCRIMP_CUDA_OK(cudaSetDevice(device), "cudaSetDevice(" << device << ")");
  const cudaError_t e = cudaMalloc(&b->ptr, bytes ? bytes : 1);
  cudaSetDevice(prev);
  if (e != cudaSuccess) {
    b->ptr = nullptr;
    SCRIMP_FAIL("cudaMalloc of " << bytes << " bytes: " << cudaGetErrorString(e));
  }
  return b;
#else
  (void)bytes;
  (void)device;
  SCRIMP_FAIL("this build of scrimp has no CUDA backend");
#endif
}

void copy_bytes(void* dst, Device dd, const void* src, Device sd, uint64_t bytes) {
  if (!bytes) return;
  if (dd.type == DeviceType::CPU && sd.type == DeviceType::CPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if defined(SCRIMP_WITH_CUDA)
  SCRIMP_CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy of " << bytes << " bytes");
#else
  SCRIMP_FAIL("this build of scrimp has no CUDA backend (copy to/from " << device_name(dd.type == DeviceType::CPU ? sd : dd) << ")");
#endif
}

void copy_kv_rows(void* dst, Device dst_dev, const TensorView& src, std::size_t elem) {
  // src: [H, T, D] (a leading batch dim of 1 already dropped by the caller), D contiguous.
  const int64_t H = src.shape[0], T = src.shape[1], D = src.shape[2];
  const uint64_t row = static_cast<uint64_t>(D) * elem;
  char* out = static_cast<char*>(dst);
  const char* in = static_cast<const char*>(src.data);
  const bool dense = src.strides[1] == D && (H == 1 || src.strides[0] == T * D);
  if (dense) {
    copy_bytes(out, dst_dev, in, src.device, row * H * T);
    return;
  }
  if (src.device.type == DeviceType::CPU && dst_dev.type == DeviceType::CPU) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        std::memcpy(out + (h * T + t) * row, in + (h * src.strides[0] + t * src.strides[1]) * elem, row);
    return;
  }
#if defined(SCRIMP_WITH_CUDA)
  for (int64_t h = 0; h < H; ++h)
    SCRIMP_CUDA_OK(cudaMemcpy2D(out + h * T * row, row, in + h * src.strides[0] * elem, src.strides[1] * elem, row,
                                T, cudaMemcpyDefault),
                   "cudaMemcpy2D");
#else
  SCRIMP_FAIL("this build of scrimp has no CUDA backend");
#endif
}

}  // namespace detail
}  // namespace scrimp
