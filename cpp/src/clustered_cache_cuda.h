// Internal: CUDA entry points of the IceCache backend (cuda/clustered_cache.cu and
// cuda/clustered_cache_mma.cu). Only compiled and called when SCRIMP_WITH_CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

#include "scrimp/clustered_cache.h"

namespace scrimp {
namespace cuda {

// True when a CUDA driver and at least one device are usable.
bool usable();

// Pinned, mapped host memory (cudaHostAlloc with cudaHostAllocMapped | cudaHostAllocPortable).
// Returns null on failure (the caller reports it); *device_ptr receives the mapped device address.
void* host_alloc_mapped(std::size_t bytes, void** device_ptr);
void host_free(void* ptr);

// Per-ClusteredCache transfer state (pinned page lists, events). Created on the first CUDA recall.
struct Transfers;
Transfers* transfers_create(int device);
void transfers_destroy(Transfers* t);  // waits for a gather still reading the lists

// Copies n pages of the pinned pool into store rows: for i < n, keys of pool page src[i] to row
// dst[i] of k_store and values to row dst[i] of v_store. src/dst are host arrays. The copy runs as
// one gather kernel reading mapped pinned memory on the device's dedicated copy stream, after the
// work queued so far on `stream` (the compute stream). With `wait`, `stream` then waits for it with
// an event, so only work queued after this call on `stream` is ordered after the copy; without it
// (a prefetch) that wait is added by the next wait_transfers on this state.
void gather_pages(Transfers* t, const void* pool_device_base, int64_t page_bytes, const int32_t* src,
                  const int32_t* dst, int64_t n, void* k_store, void* v_store, int64_t row_bytes, void* stream,
                  bool wait);
// Makes `stream` wait for this state's last gather if it has not been made to yet.
void wait_transfers(Transfers* t, void* stream);

// Arguments validated by scrimp::paged_decode_attention; all tensors on the same CUDA device.
void paged_decode_attention(const PagedAttentionArgs& args);

// out[n] = argmax_c keys[n] . centroids[c]; keys [N, D], centroids [C, D], same float dtype, CUDA.
void nearest_centroid(const TensorView& keys, const TensorView& centroids, int32_t* out, void* stream);
// The same on tensor cores, argmax fused into the GEMM epilogue (cuda/clustered_cache_mma.cu; CUTLASS /
// CuTe builds only). Returns false when it does not handle the input (float32, no CUTLASS).
bool nearest_centroid_mma(const TensorView& keys, const TensorView& centroids, int32_t* out, void* stream);

}  // namespace cuda
}  // namespace scrimp
