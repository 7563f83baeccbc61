// libFuzzer target: the packet file format (what a store reads back from its disk directory).
// The check itself (with its checksum repair) is in packet_file_check.h, shared with the regression
// replay in the C++ test suite.
//
//   build: cmake -S . -B build/fuzz -DCMAKE_CXX_COMPILER=clang++ -DSCRIMP_FUZZ=ON -DSCRIMP_CUDA=OFF
//   run:   build/fuzz/fuzz_packet_file fuzz/corpus/packet_file -max_total_time=60
#include "packet_file_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  scrimp_fuzz::check_packet_file_bytes(data, size);
  return 0;
}
