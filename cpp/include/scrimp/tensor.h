// TensorView: a non-owning view of strided memory (raw pointer + shape + strides in elements),
// the only tensor type the C++ API knows. Nothing here depends on torch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace scrimp {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3, Int64 = 4, Int32 = 5, UInt8 = 6 };
enum class DeviceType : int { CPU = 0, CUDA = 1 };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
std::string device_name(Device device);

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, same length as shape

  int64_t ndim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  // True when the elements are densely packed in row-major order.
  bool is_contiguous() const;

  // A contiguous row-major view over `data`.
  static TensorView contiguous(void* data, DType dtype, Device device, std::vector<int64_t> shape);
};

// Describes a tensor for error messages: "bfloat16[4, 7, 1271] on cuda:0".
std::string describe(const TensorView& t);

}  // namespace scrimp
