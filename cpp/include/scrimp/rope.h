// RoPE re-rotation of cached keys (moving KV computed at positions p to positions p + delta) and the
// fused assembly of several KV packets into one per-layer K/V cache.
//
// A key rotated for position p is R(p) k where R(p) rotates each pair (x_i, y_i) by angle
// p * inv_freq[i]. Since R(p + d) = R(d) R(p), re-rotating by d needs only cos/sin(d * inv_freq[i]).
// Pairs: layout Half (HF rotate_half) pairs element i with i + R/2; Interleaved (GPT-J) pairs 2i and
// 2i+1; R = 2 * len(inv_freq) <= head_dim (elements past R are not rotated). Angles are computed in
// float64, the rotation in float32 (float64 for float64 keys).
#pragma once
#include <cstdint>
#include <vector>

#include "scrimp/tensor.h"

namespace scrimp {

// How the rotated pairs of a head are laid out.
enum class RopeLayout : int {
  Half = 0,         // HF rotate_half: element i pairs with i + R/2
  Interleaved = 1,  // GPT-J: elements 2i and 2i + 1
};

struct RerotateArgs {
  TensorView keys;                       // [B, H, S, D], head_dim contiguous; f32/f16/bf16/f64
  TensorView out;                        // [B, H, S, D] same dtype/device; may be `keys` itself
  int64_t delta = 0;                     // used when delta_per_pos is null
  const TensorView* delta_per_pos = nullptr;  // int64 [S] on the keys' device, or null
  std::vector<double> inv_freq;          // [R/2] rotary frequencies (host)
  RopeLayout layout = RopeLayout::Half;
  void* stream = nullptr;                // cudaStream_t for CUDA tensors
};
void rerotate_keys(const RerotateArgs& args);

// One part of an assembly: a packet (or any [H, T, D] K/V per layer) placed at `new_start`.
struct AssemblePart {
  std::vector<TensorView> keys, values;  // [num_layers] x [H, T, D] contiguous, on the output's device
  int64_t delta = 0;                     // new_start - position the keys were computed at
  std::vector<double> inv_freq;          // [R/2]
  RopeLayout layout = RopeLayout::Half;
};
struct AssembleArgs {
  std::vector<AssemblePart> parts;
  std::vector<TensorView> out_keys, out_values;  // [num_layers] x [1, H, S, D] (D contiguous)
  int64_t seq_offset = 0;                // the first part lands at sequence index seq_offset
  void* stream = nullptr;
};
// Re-rotates every part's keys by its delta and writes parts back to back along the sequence
// (part i at seq_offset + sum of earlier parts' lengths): one read of every packet byte.
void assemble_kv(const AssembleArgs& args);

}  // namespace scrimp
