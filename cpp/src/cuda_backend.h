// Internal: entry points of the CUDA backend (cuda/*.cu). Only called when SCRIMP_WITH_CUDA.
#pragma once
#include <string>

#include "scrimp/scoring.h"

namespace scrimp {
namespace cuda {

// Number of usable devices; 0 with `status` saying why (no driver, no device...).
int device_count(std::string* status);

// Arguments already validated by scrimp::token_scores; all tensors on the same CUDA device.
void token_scores(const TokenScoresArgs& args);

}  // namespace cuda
}  // namespace scrimp
