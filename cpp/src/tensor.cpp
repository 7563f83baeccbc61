#include "scrimp/tensor.h"

#include <sstream>

#include "scrimp/error.h"

namespace scrimp {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Float64: return 8;
    case DType::Int64: return 8;
    case DType::Int32: return 4;
    case DType::UInt8: return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

std::string device_name(Device device) {
  return device.type == DeviceType::CPU ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

bool TensorView::is_contiguous() const {
  // no element is ever addressed in an empty tensor, whatever its strides (torch gives [0, 0] strides
  // (1, 1), which the loop below would reject)
  for (int64_t d = 0; d < ndim(); ++d)
    if (shape[d] == 0) return true;
  int64_t expected = 1;
  for (int64_t d = ndim() - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

TensorView TensorView::contiguous(void* data, DType dtype, Device device, std::vector<int64_t> shape) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.strides.assign(shape.size(), 1);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 2; d >= 0; --d) t.strides[d] = t.strides[d + 1] * shape[d + 1];
  t.shape = std::move(shape);
  return t;
}

std::string describe(const TensorView& t) {
  std::ostringstream oss;
  oss << dtype_name(t.dtype) << "[";
  for (std::size_t i = 0; i < t.shape.size(); ++i) oss << (i ? ", " : "") << t.shape[i];
  oss << "] on " << device_name(t.device);
  return oss.str();
}

}  // namespace scrimp
