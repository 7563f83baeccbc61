// Bindings of scrimp::token_scores (cpp/include/scrimp/scoring.h).
#include <memory>
#include <vector>

#include "dlpack_view.h"
#include "registry.h"
#include "scrimp/error.h"
#include "scrimp/scoring.h"

namespace py = pybind11;
using scrimp::bindings::BorrowedTensor;

namespace {

// A float32 contiguous [rows] output on `device`, or null when `obj` is None.
float* output_pointer(const py::object& obj, const char* name, int64_t rows, const scrimp::Device& device,
                      std::vector<std::unique_ptr<BorrowedTensor>>& keep) {
  if (obj.is_none()) return nullptr;
  keep.push_back(std::make_unique<BorrowedTensor>(obj, name));
  const scrimp::TensorView& v = keep.back()->view();
  SCRIMP_CHECK_TYPE(v.dtype == scrimp::DType::Float32, name << ": expected a float32 output, got " << describe(v));
  SCRIMP_CHECK(v.numel() == rows && v.is_contiguous(),
               name << ": expected a contiguous output of " << rows << " elements, got " << describe(v));
  SCRIMP_CHECK(v.device == device, name << ": expected an output on " << device_name(device) << ", got "
                                        << device_name(v.device));
  return static_cast<float*>(v.data);
}

void token_scores(const py::object& student, const py::object& teacher, const py::object& targets,
                  double temperature, const py::object& student_entropy, const py::object& teacher_entropy,
                  const py::object& kl_forward, const py::object& kl_reverse, const py::object& student_logprob,
                  const py::object& teacher_logprob, uintptr_t stream) {
  BorrowedTensor s(student, "student_logits");
  std::unique_ptr<BorrowedTensor> t, g;
  scrimp::TokenScoresArgs args;
  args.student = s.view();
  if (!teacher.is_none()) {
    t = std::make_unique<BorrowedTensor>(teacher, "teacher_logits");
    args.teacher = &t->view();
  }
  if (!targets.is_none()) {
    g = std::make_unique<BorrowedTensor>(targets, "targets");
    args.targets = &g->view();
  }
  args.temperature = static_cast<float>(temperature);
  SCRIMP_CHECK(!args.student.shape.empty(), "student_logits: expected shape [..., V], got a 0-d tensor");
  const int64_t V = args.student.shape.back();
  const int64_t rows = V > 0 ? args.student.numel() / V : 0;
  std::vector<std::unique_ptr<BorrowedTensor>> keep;
  const scrimp::Device dev = args.student.device;
  args.student_entropy = output_pointer(student_entropy, "student_entropy", rows, dev, keep);
  args.teacher_entropy = output_pointer(teacher_entropy, "teacher_entropy", rows, dev, keep);
  args.kl_forward = output_pointer(kl_forward, "kl_forward", rows, dev, keep);
  args.kl_reverse = output_pointer(kl_reverse, "kl_reverse", rows, dev, keep);
  args.student_logprob = output_pointer(student_logprob, "student_logprob", rows, dev, keep);
  args.teacher_logprob = output_pointer(teacher_logprob, "teacher_logprob", rows, dev, keep);
  args.stream = reinterpret_cast<void*>(stream);
  py::gil_scoped_release release;
  scrimp::token_scores(args);
}

}  // namespace

SCRIMP_BINDINGS(scoring) {
  m.def("token_scores", &token_scores, py::arg("student"), py::arg("teacher"), py::arg("targets"),
        py::arg("temperature"), py::arg("student_entropy"), py::arg("teacher_entropy"), py::arg("kl_forward"),
        py::arg("kl_reverse"), py::arg("student_logprob"), py::arg("teacher_logprob"), py::arg("stream") = 0,
        "Fill the given float32 [N] outputs (None to skip) with fused token scores.");
}
