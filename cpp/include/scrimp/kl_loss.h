// Fused distillation loss: per-row KL / generalized JSD between softmax(student / T) and
// softmax(teacher / T), with the gradient with respect to the student logits written in the same call
// (in the logits' dtype), so no float32 [N, V] intermediate ever exists.
//
// Definitions (natural log, p = softmax(student / T), q = softmax(teacher / T), per row):
//   Reverse : L = KL(p || q)                       dL/ds_j = p_j (log p_j - log q_j - L) / T
//   Forward : L = KL(q || p)                       dL/ds_j = (p_j - q_j) / T
//   JSD     : m = beta q + (1 - beta) p,
//             L = beta KL(q || m) + (1 - beta) KL(p || m)
//                                                  dL/ds_j = (1 - beta) p_j (log p_j - log m_j - KL(p || m)) / T
// JSD matches TRL's GKDTrainer.generalized_jsd_loss, including its special cases: beta = 0 is the
// forward KL and beta = 1 the reverse KL (there the mixture formula would be identically 0).
// A -inf logit is a masked vocabulary entry: p = 0 there and it contributes 0 to every sum and 0 to
// the gradient; a -inf teacher logit where p > 0 makes the reverse KL +inf (and symmetrically).
#pragma once
#include "scrimp/span.h"
#include "scrimp/tensor.h"

namespace scrimp {

enum class KLKind : int { Reverse = 0, Forward = 1, JSD = 2 };

struct KLLossArgs {
  TensorView student;  // [..., V] float32/float16/bfloat16; last dim contiguous, other strides free
  TensorView teacher;  // same shape, dtype and device as student (strides free as for student)
  KLKind kind = KLKind::Reverse;
  float beta = 0.5f;         // JSD interpolation, in [0, 1]
  float temperature = 1.0f;  // > 0 and finite

  // Output: float32 contiguous [N] per-row losses, N = prod(leading shape). Required.
  Span<float> loss;
  // Optional output: contiguous [..., V] in the student's dtype and on its device; receives
  // grad_scale * dL_row / d student_logits for every row (e.g. grad_scale = 1/N for a mean).
  const TensorView* grad = nullptr;
  float grad_scale = 1.0f;

  void* stream = nullptr;  // cudaStream_t for CUDA tensors (null: the legacy default stream)
};

// Validates every argument (throws scrimp::Error) and runs the CPU or CUDA backend (asynchronous
// on `stream` for CUDA tensors).
void kl_loss(const KLLossArgs& args);

const char* kl_kind_name(KLKind kind);

}  // namespace scrimp
