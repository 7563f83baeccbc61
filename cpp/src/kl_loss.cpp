// kl_loss: argument validation and CPU/CUDA dispatch.
#include "scrimp/kl_loss.h"

#include <cmath>
#include <cstring>

#include "kl_loss_cpu.h"
#include "logits_checks.h"
#include "kl_loss_cuda.h"
#include "scrimp/build_info.h"
#include "scrimp/error.h"


namespace scrimp {

const char* kl_kind_name(KLKind kind) {
  switch (kind) {
    case KLKind::Reverse: return "reverse";
    case KLKind::Forward: return "forward";
    case KLKind::JSD: return "jsd";
  }
  return "?";
}

void kl_loss(const KLLossArgs& args) {
  const TensorView& s = args.student;
  const TensorView& t = args.teacher;
  check_logits(s, "student_logits");
  check_logits(t, "teacher_logits");
  SCRIMP_CHECK(t.shape.back() == s.shape.back(),
               "teacher/student vocabulary mismatch: student " << describe(s) << ", teacher " << describe(t));
  SCRIMP_CHECK(t.shape == s.shape, "teacher_logits: expected the student's shape " << describe(s) << ", got "
                                                                                  << describe(t));
  SCRIMP_CHECK_TYPE(t.dtype == s.dtype, "teacher_logits: expected the student's dtype " << dtype_name(s.dtype)
                                                                                        << ", got " << dtype_name(t.dtype));
  SCRIMP_CHECK(t.device == s.device, "teacher_logits: expected the student's device " << device_name(s.device)
                                                                                      << ", got " << device_name(t.device));
  SCRIMP_CHECK(args.kind == KLKind::Reverse || args.kind == KLKind::Forward || args.kind == KLKind::JSD,
               "kind: expected reverse, forward or jsd");
  SCRIMP_CHECK(std::isfinite(args.temperature) && args.temperature > 0.0f,
               "temperature: expected a finite value > 0, got " << args.temperature);
  SCRIMP_CHECK(args.beta >= 0.0f && args.beta <= 1.0f, "beta: expected a value in [0, 1], got " << args.beta);
  SCRIMP_CHECK(std::isfinite(args.grad_scale), "grad_scale: expected a finite value, got " << args.grad_scale);
  const int64_t V = s.shape.back();
  const int64_t rows = s.numel() / V;
  SCRIMP_CHECK(rows == 0 || args.loss.given(), "loss: an output is required");
  check_output(args.loss, rows, "loss");
  if (args.grad) {
    const TensorView& g = *args.grad;
    SCRIMP_CHECK(g.shape == s.shape && g.is_contiguous(),
                 "grad: expected a contiguous output of the student's shape " << describe(s) << ", got " << describe(g));
    SCRIMP_CHECK_TYPE(g.dtype == s.dtype, "grad: expected the student's dtype " << dtype_name(s.dtype) << ", got "
                                                                                << dtype_name(g.dtype));
    SCRIMP_CHECK(g.device == s.device, "grad: expected device " << device_name(s.device) << ", got "
                                                                << device_name(g.device));
    SCRIMP_CHECK(g.numel() == 0 || g.data != nullptr, "grad: null data pointer");
  }
  if (rows == 0) return;

  // TRL's generalized JSD special cases: the mixture formula vanishes at beta = 0 and 1.
  KLKind kind = args.kind;
  if (kind == KLKind::JSD && args.beta == 0.0f) kind = KLKind::Forward;
  if (kind == KLKind::JSD && args.beta == 1.0f) kind = KLKind::Reverse;

  if (s.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::kl_loss(args, kind);
    return;
#else
    SCRIMP_FAIL("student_logits is on " << device_name(s.device)
                                        << " but this build of scrimp has no CUDA backend (rebuild with nvcc and "
                                           "SCRIMP_CUDA=AUTO or ON)");
#endif
  }

  const std::size_t lead_ndim = s.shape.size() - 1;
  cpu::KLRowsJob job;
  job.args = &args;
  job.rows = rows;
  job.vocab = V;
  job.inv_temperature = 1.0f / args.temperature;
  job.kind = kind;
  job.beta = args.beta;
  job.grad_factor = args.grad_scale / args.temperature;
  job.lead_shape = leading(s.shape, lead_ndim);
  job.student_strides = leading(s.strides, lead_ndim);
  job.teacher_strides = leading(t.strides, lead_ndim);

#if defined(SCRIMP_X86_SIMD)
  cpu::run_rows(job, rows, cpu::kl_rows_generic, cpu::kl_rows_avx2, cpu::kl_rows_avx512);
#else
  cpu::run_rows<cpu::KLRowsJob>(job, rows, cpu::kl_rows_generic, nullptr, nullptr);
#endif
}

}  // namespace scrimp
