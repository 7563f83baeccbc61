// Argument checks shared by every public function that takes [..., V] logits.
#include "logits_checks.h"

#include "scrimp/error.h"

namespace scrimp {

void check_logits(const TensorView& t, const char* name) {
  SCRIMP_CHECK(t.ndim() >= 1, name << ": expected shape [..., V], got a 0-d tensor");
  SCRIMP_CHECK(static_cast<int64_t>(t.strides.size()) == t.ndim(), name << ": strides and shape differ in length");
  const bool float_logits = t.dtype == DType::Float32 || t.dtype == DType::Float16 || t.dtype == DType::BFloat16;
  SCRIMP_CHECK_TYPE(float_logits, name << ": expected float32, float16 or bfloat16 logits, got " << describe(t));
  for (int64_t s : t.shape) SCRIMP_CHECK(s >= 0, name << ": negative dimension in " << describe(t));
  const int64_t V = t.shape.back();
  SCRIMP_CHECK(V >= 1, name << ": the vocabulary (last) dimension must be >= 1, got " << describe(t));
  SCRIMP_CHECK(t.numel() == 0 || t.strides.back() == 1 || V == 1,
               name << ": the last (vocabulary) dimension must be contiguous (stride 1), got stride "
                    << t.strides.back());
  SCRIMP_CHECK(t.numel() == 0 || t.data != nullptr, name << ": null data pointer for " << describe(t));
}

void check_output(const Span<float>& out, int64_t rows, const char* name) {
  if (!out.given() && out.size == 0) return;
  SCRIMP_CHECK(out.size == rows, name << ": expected a contiguous output of " << rows << " elements, got " << out.size);
  SCRIMP_CHECK(rows == 0 || out.data != nullptr, name << ": null data pointer");
}

std::vector<int64_t> leading(const std::vector<int64_t>& v, std::size_t n) {
  return std::vector<int64_t>(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(n));
}

}  // namespace scrimp
