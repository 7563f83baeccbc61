// Internal: CUDA entry points of the IceCache backend (cuda/clustered_cache.cu). Only compiled and
// called when SCRIMP_WITH_CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

#include "scrimp/clustered_cache.h"

namespace scrimp {
namespace ice_cuda {

// True when a CUDA driver and at least one device are usable.
bool usable();

// Pinned, mapped host memory (cudaHostAlloc with cudaHostAllocMapped | cudaHostAllocPortable).
// Returns null on failure (the caller reports it); *device_ptr receives the mapped device address.
void* host_alloc_mapped(std::size_t bytes, void** device_ptr);
void host_free(void* ptr);

// Copies n pages of the pinned pool into store rows: for i < n, keys of pool page src[i] to row
// dst[i] of k_store and values to row dst[i] of v_store. src/dst are host arrays. The copy runs as
// one gather kernel reading mapped pinned memory on a dedicated copy stream; `stream` (the compute
// stream) waits for it with an event, so only work queued after this call on `stream` is ordered
// after the copy.
void gather_pages(const void* pool_device_base, int64_t page_bytes, const int32_t* src, const int32_t* dst,
                  int64_t n, void* k_store, void* v_store, int64_t row_bytes, int device, void* stream);

// Arguments validated by scrimp::paged_decode_attention; all tensors on the same CUDA device.
void paged_decode_attention(const PagedAttentionArgs& args);

// out[n] = argmax_c keys[n] . centroids[c]; keys [N, D], centroids [C, D], same float dtype, CUDA.
void nearest_centroid(const TensorView& keys, const TensorView& centroids, int32_t* out, void* stream);
// The same on tensor cores, argmax fused into the GEMM epilogue (cuda/nearest_centroid_mma.cu; CUTLASS /
// CuTe builds only). Returns false when it does not handle the input (float32, no CUTLASS).
bool nearest_centroid_mma(const TensorView& keys, const TensorView& centroids, int32_t* out, void* stream);

}  // namespace ice_cuda
}  // namespace scrimp
