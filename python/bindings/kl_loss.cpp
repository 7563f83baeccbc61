// Bindings of scrimp::kl_loss (cpp/include/scrimp/kl_loss.h).
#include <memory>

#include "dlpack_view.h"
#include "registry.h"
#include "scrimp/error.h"
#include "scrimp/kl_loss.h"

namespace py = pybind11;
using scrimp::bindings::BorrowedTensor;

namespace {

void kl_loss(const py::object& student, const py::object& teacher, int kind, double beta, double temperature,
             const py::object& loss, const py::object& grad, double grad_scale, uintptr_t stream) {
  BorrowedTensor s(student, "student_logits");
  BorrowedTensor t(teacher, "teacher_logits");
  BorrowedTensor l(loss, "loss");
  std::unique_ptr<BorrowedTensor> g;
  scrimp::KLLossArgs args;
  args.student = s.view();
  args.teacher = t.view();
  args.kind = static_cast<scrimp::KLKind>(kind);
  args.beta = static_cast<float>(beta);
  args.temperature = static_cast<float>(temperature);
  args.loss = scrimp::bindings::float32_output(l.view(), "loss", args.student.device);
  if (!grad.is_none()) {
    g = std::make_unique<BorrowedTensor>(grad, "grad");
    args.grad = &g->view();
  }
  args.grad_scale = static_cast<float>(grad_scale);
  args.stream = reinterpret_cast<void*>(stream);
  py::gil_scoped_release release;
  scrimp::kl_loss(args);
}

}  // namespace

SCRIMP_BINDINGS(kl_loss) {
  m.def("kl_loss", &kl_loss, py::arg("student"), py::arg("teacher"), py::arg("kind"), py::arg("beta"),
        py::arg("temperature"), py::arg("loss"), py::arg("grad"), py::arg("grad_scale"), py::arg("stream") = 0,
        "Per-row fused KL/JSD loss into float32 [N] `loss`; optionally grad_scale * dloss/dstudent into `grad`.");
}
