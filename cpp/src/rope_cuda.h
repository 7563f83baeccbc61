// Internal: CUDA entry points of the RoPE re-rotation (cuda/rope.cu). Only with SCRIMP_WITH_CUDA.
#pragma once
#include "scrimp/rope.h"

namespace scrimp {
namespace cuda {
// Arguments validated by scrimp::rerotate_keys / assemble_kv; tensors on one CUDA device.
void rerotate_keys(const RerotateArgs& args);
void assemble_kv(const AssembleArgs& args);
}  // namespace cuda
}  // namespace scrimp
