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

// A float32 contiguous output on `device` as the Span token_scores takes (it checks the size), or
// an empty span when `obj` is None.
scrimp::Span<float> output_span(const py::object& obj, const char* name, const scrimp::Device& device,
                                std::vector<std::unique_ptr<BorrowedTensor>>& keep) {
  if (obj.is_none()) return {};
  keep.push_back(std::make_unique<BorrowedTensor>(obj, name));
  return scrimp::bindings::float32_output(keep.back()->view(), name, device);
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
  std::vector<std::unique_ptr<BorrowedTensor>> keep;
  const scrimp::Device dev = args.student.device;
  args.student_entropy = output_span(student_entropy, "student_entropy", dev, keep);
  args.teacher_entropy = output_span(teacher_entropy, "teacher_entropy", dev, keep);
  args.kl_forward = output_span(kl_forward, "kl_forward", dev, keep);
  args.kl_reverse = output_span(kl_reverse, "kl_reverse", dev, keep);
  args.student_logprob = output_span(student_logprob, "student_logprob", dev, keep);
  args.teacher_logprob = output_span(teacher_logprob, "teacher_logprob", dev, keep);
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
