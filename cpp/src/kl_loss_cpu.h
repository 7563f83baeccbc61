// Internal: the CPU backend of kl_loss, one entry point per instruction set.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu_rows.h"

#include "scrimp/kl_loss.h"

namespace scrimp {
namespace cpu {

struct KLRowsJob : LeadingDims {
  const KLLossArgs* args = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  float inv_temperature = 1.0f;
  KLKind kind = KLKind::Reverse;  // after the beta = 0 / 1 special cases of JSD are resolved
  float beta = 0.5f;
  float grad_factor = 1.0f;  // grad_scale / T
  std::vector<int64_t> student_strides;  // leading strides in elements
  std::vector<int64_t> teacher_strides;

};

void kl_rows_generic(const KLRowsJob& job, int64_t begin, int64_t end);
#if defined(SCRIMP_X86_SIMD)
void kl_rows_avx2(const KLRowsJob& job, int64_t begin, int64_t end);
void kl_rows_avx512(const KLRowsJob& job, int64_t begin, int64_t end);
#endif

}  // namespace cpu
}  // namespace scrimp
