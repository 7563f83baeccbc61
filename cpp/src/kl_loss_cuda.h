// Internal: the CUDA backend of kl_loss (cuda/kl_loss.cu). Only called when SCRIMP_WITH_CUDA.
#pragma once
#include "scrimp/kl_loss.h"

namespace scrimp {
namespace cuda {

// Arguments already validated by scrimp::kl_loss; `kind` has the JSD beta = 0 / 1 cases resolved.
void kl_loss(const KLLossArgs& args, KLKind kind);

}  // namespace cuda
}  // namespace scrimp
