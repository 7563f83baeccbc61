// Internal: the CUDA backend of token_scores (cuda/scoring.cu). Only called when SCRIMP_WITH_CUDA.
#pragma once
#include "scrimp/scoring.h"

namespace scrimp {
namespace cuda {

// Arguments already validated by scrimp::token_scores; all tensors on the same CUDA device.
void token_scores(const TokenScoresArgs& args);

}  // namespace cuda
}  // namespace scrimp
