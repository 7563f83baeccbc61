// token_scores: argument validation and CPU/CUDA dispatch.
#include "scrimp/scoring.h"

#include <cmath>
#include <cstring>

#include "scoring_cuda.h"
#include "logits_checks.h"
#include "scoring_cpu.h"
#include "scrimp/build_info.h"
#include "scrimp/error.h"

namespace scrimp {

void token_scores(const TokenScoresArgs& args) {
  const TensorView& s = args.student;
  check_logits(s, "student_logits");
  SCRIMP_CHECK(std::isfinite(args.temperature) && args.temperature > 0.0f,
               "temperature: expected a finite value > 0, got " << args.temperature);
  const std::size_t lead_ndim = s.shape.size() - 1;
  const std::vector<int64_t> lead_shape = leading(s.shape, lead_ndim);

  if (args.teacher) {
    const TensorView& t = *args.teacher;
    check_logits(t, "teacher_logits");
    SCRIMP_CHECK(t.shape == s.shape, "teacher_logits: expected the student's shape " << describe(s) << ", got "
                                                                                    << describe(t));
    SCRIMP_CHECK_TYPE(t.dtype == s.dtype, "teacher_logits: expected the student's dtype "
                                              << dtype_name(s.dtype) << ", got " << dtype_name(t.dtype));
    SCRIMP_CHECK(t.device == s.device, "teacher_logits: expected the student's device "
                                           << device_name(s.device) << ", got " << device_name(t.device));
  }
  SCRIMP_CHECK(!(args.teacher_entropy || args.kl_forward || args.kl_reverse || args.teacher_logprob) || args.teacher,
               "teacher outputs were requested without teacher_logits");
  SCRIMP_CHECK(!(args.student_logprob || args.teacher_logprob) || args.targets,
               "log-probability outputs were requested without targets");
  if (args.targets) {
    const TensorView& g = *args.targets;
    SCRIMP_CHECK_TYPE(g.dtype == DType::Int64, "targets: expected int64, got " << describe(g));
    SCRIMP_CHECK(g.shape == lead_shape, "targets: expected the logits' leading shape (logits "
                                            << describe(s) << "), got " << describe(g));
    SCRIMP_CHECK(g.device == s.device, "targets: expected device " << device_name(s.device) << ", got "
                                                                   << device_name(g.device));
    SCRIMP_CHECK(g.numel() == 0 || g.data != nullptr, "targets: null data pointer");
  }

  const int64_t rows = s.numel() / (s.shape.back() > 0 ? s.shape.back() : 1);
  const std::pair<const Span<float>*, const char*> outputs[] = {
      {&args.student_entropy, "student_entropy"}, {&args.teacher_entropy, "teacher_entropy"},
      {&args.kl_forward, "kl_forward"},           {&args.kl_reverse, "kl_reverse"},
      {&args.student_logprob, "student_logprob"}, {&args.teacher_logprob, "teacher_logprob"}};
  for (const auto& o : outputs) check_output(*o.first, rows, o.second);
  if (s.numel() == 0 || rows == 0) return;

  if (s.device.type == DeviceType::CUDA) {
#if defined(SCRIMP_WITH_CUDA)
    cuda::token_scores(args);
    return;
#else
    SCRIMP_FAIL("student_logits is on " << device_name(s.device)
                                        << " but this build of scrimp has no CUDA backend (rebuild with nvcc and "
                                           "SCRIMP_CUDA=AUTO or ON)");
#endif
  }

  cpu::ScoreRowsJob job;
  job.args = &args;
  job.rows = rows;
  job.vocab = s.shape.back();
  job.inv_temperature = 1.0f / args.temperature;
  job.lead_shape = lead_shape;
  job.student_strides = leading(s.strides, lead_ndim);
  if (args.teacher) job.teacher_strides = leading(args.teacher->strides, lead_ndim);
  if (args.targets) {
    job.target_strides = args.targets->strides;
    // The CPU can check targets without a device sync, so out-of-range is an error, not a NaN.
    const int64_t* tg = static_cast<const int64_t*>(args.targets->data);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = tg[job.offset(r, job.target_strides)];
      SCRIMP_CHECK(v >= 0 && v < job.vocab,
                   "targets: expected values in [0, " << job.vocab << "), got " << v << " at flat index " << r);
    }
  }

#if defined(SCRIMP_X86_SIMD)
  cpu::run_rows(job, rows, cpu::score_rows_generic, cpu::score_rows_avx2, cpu::score_rows_avx512);
#else
  cpu::run_rows<cpu::ScoreRowsJob>(job, rows, cpu::score_rows_generic, nullptr, nullptr);
#endif
}

}  // namespace scrimp
