// Internal: the CPU backend of RoPE re-rotation and assembly (rope_kernel.inc), one entry point per
// instruction set; rope.cpp checks the arguments and picks one by cpu_simd_level().
#pragma once
#include "scrimp/rope.h"

namespace scrimp {
namespace cpu {

void rerotate_keys_generic(const RerotateArgs& args);
void assemble_kv_generic(const AssembleArgs& args);
#if defined(SCRIMP_X86_SIMD)
void rerotate_keys_avx2(const RerotateArgs& args);
void assemble_kv_avx2(const AssembleArgs& args);
void rerotate_keys_avx512(const RerotateArgs& args);
void assemble_kv_avx512(const AssembleArgs& args);
#endif

}  // namespace cpu
}  // namespace scrimp
