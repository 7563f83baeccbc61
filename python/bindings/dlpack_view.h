// Borrowing a torch (or any DLPack) tensor as a scrimp::TensorView for the duration of a call.
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "dlpack.h"
#include "scrimp/span.h"
#include "scrimp/tensor.h"

namespace scrimp {
namespace bindings {

// Owns one consumed DLPack capsule; the producer's memory stays alive until this is destroyed.
// "float32" | "float16" | "bfloat16" -> DType; anything else is a TypeError naming `what`.
DType float_dtype_from_name(const std::string& name, const char* what);

// A float32 contiguous output on `device` as a Span (the C++ API checks its size); a wrong dtype is
// a TypeError, a non-contiguous tensor or another device a ValueError, each naming `name`.
Span<float> float32_output(const TensorView& v, const char* name, const Device& device);

class BorrowedTensor {
 public:
  // `obj` must implement __dlpack__ / __dlpack_device__ (torch.Tensor does). `name` is the argument
  // name used in error messages.
  BorrowedTensor(const pybind11::handle& obj, const char* name);
  ~BorrowedTensor();
  BorrowedTensor(const BorrowedTensor&) = delete;
  BorrowedTensor& operator=(const BorrowedTensor&) = delete;

  const TensorView& view() const { return view_; }

 private:
  void fill_view(const char* name);
  DLManagedTensor* managed_ = nullptr;
  TensorView view_;
};

}  // namespace bindings
}  // namespace scrimp
