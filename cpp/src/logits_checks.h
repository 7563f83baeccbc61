// Internal: argument checks shared by every public function that takes [..., V] logits.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "scrimp/span.h"
#include "scrimp/tensor.h"

namespace scrimp {

// Throws scrimp::Error naming `name` unless `t` is float32/float16/bfloat16 logits of shape [..., V]
// with V >= 1, a contiguous last dimension and a data pointer.
void check_logits(const TensorView& t, const char* name);

// A per-row float32 output [rows], when given: its size must be rows.
void check_output(const Span<float>& out, int64_t rows, const char* name);

// The first n entries of a shape or stride vector (the leading dims of [..., V]).
std::vector<int64_t> leading(const std::vector<int64_t>& v, std::size_t n);

}  // namespace scrimp
