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
  SCRIMP_CHECK(kind >= 0 && kind <= 2, "kind: expected 0 (reverse), 1 (forward) or 2 (jsd), got " << kind);
  args.kind = static_cast<scrimp::KLKind>(kind);
  args.beta = static_cast<float>(beta);
  args.temperature = static_cast<float>(temperature);
  SCRIMP_CHECK(!args.student.shape.empty(), "student_logits: expected shape [..., V], got a 0-d tensor");
  const int64_t V = args.student.shape.back();
  const int64_t rows = V > 0 ? args.student.numel() / V : 0;
  const scrimp::TensorView& lv = l.view();
  SCRIMP_CHECK_TYPE(lv.dtype == scrimp::DType::Float32, "loss: expected a float32 output, got " << describe(lv));
  SCRIMP_CHECK(lv.numel() == rows && lv.is_contiguous(),
               "loss: expected a contiguous output of " << rows << " elements, got " << describe(lv));
  SCRIMP_CHECK(lv.device == args.student.device, "loss: expected an output on the logits' device");
  args.loss = static_cast<float*>(lv.data);
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
