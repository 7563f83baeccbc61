// Fused token scoring: entropies, forward/reverse KL and target log-probabilities of softmax(x/T)
// rows, computed in one pass over the logits without any [N, V] intermediate.
//
// Definitions (natural log, P_S = softmax(student / T), P_T = softmax(teacher / T)):
//   student_entropy = H(P_S)          teacher_entropy = H(P_T)
//   kl_forward      = KL(P_T || P_S)  kl_reverse      = KL(P_S || P_T)
//   student_logprob = log P_S[target] teacher_logprob = log P_T[target]
// A -inf logit is a masked vocabulary entry: p = 0 and it contributes 0 to every sum, except that a
// -inf student logit where P_T > 0 makes kl_forward +inf (and symmetrically for kl_reverse).
// A NaN anywhere in a row gives NaN in every output of that row and nowhere else.
#pragma once
#include "scrimp/span.h"
#include "scrimp/tensor.h"

namespace scrimp {

struct TokenScoresArgs {
  TensorView student;   // [..., V] float32/float16/bfloat16; last dim contiguous, other strides free
  const TensorView* teacher = nullptr;  // optional: same shape, dtype and device as student
  const TensorView* targets = nullptr;  // optional: int64 [...] (the leading shape), values in [0, V)
  float temperature = 1.0f;  // > 0 and finite

  // Outputs: float32, contiguous [N] where N = prod(leading shape), on the logits' device (the size
  // of each given span is checked). Each may be left empty when not wanted; the teacher outputs need
  // a teacher, logprobs need targets.
  Span<float> student_entropy;
  Span<float> teacher_entropy;
  Span<float> kl_forward;
  Span<float> kl_reverse;
  Span<float> student_logprob;
  Span<float> teacher_logprob;

  void* stream = nullptr;  // cudaStream_t for CUDA tensors (null: the legacy default stream)
};

// Validates every argument (throws scrimp::Error) and runs the CPU or CUDA backend.
// On CUDA the call is asynchronous on `stream`; target values outside [0, V) give NaN log-probs there
// (the CPU backend throws instead, since it can check without a device synchronisation).
void token_scores(const TokenScoresArgs& args);

}  // namespace scrimp
