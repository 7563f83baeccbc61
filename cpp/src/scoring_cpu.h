// Internal: the CPU backend of token_scores, one entry point per instruction set.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu_rows.h"
#include "scrimp/scoring.h"

namespace scrimp {
namespace cpu {

// Everything a worker needs to find row r of every tensor; built once per call by scoring.cpp.
struct ScoreRowsJob : LeadingDims {
  const TokenScoresArgs* args = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  float inv_temperature = 1.0f;
  std::vector<int64_t> student_strides;  // leading strides in elements
  std::vector<int64_t> teacher_strides;
  std::vector<int64_t> target_strides;

};

// Each computes rows [begin, end) single-threaded; scoring.cpp splits rows across OpenMP threads.
void score_rows_generic(const ScoreRowsJob& job, int64_t begin, int64_t end);
#if defined(SCRIMP_X86_SIMD)
void score_rows_avx2(const ScoreRowsJob& job, int64_t begin, int64_t end);
void score_rows_avx512(const ScoreRowsJob& job, int64_t begin, int64_t end);
#endif

}  // namespace cpu
}  // namespace scrimp
