#include "dlpack_view.h"

#include "scrimp/error.h"

namespace py = pybind11;

namespace scrimp {
namespace bindings {

namespace {

DType to_dtype(const DLDataType& t, const char* name) {
  SCRIMP_CHECK_TYPE(t.lanes == 1, name << ": vector dtypes (lanes != 1) are not supported");
  if (t.code == kScrimpDLFloat && t.bits == 32) return DType::Float32;
  if (t.code == kScrimpDLFloat && t.bits == 16) return DType::Float16;
  if (t.code == kScrimpDLBfloat && t.bits == 16) return DType::BFloat16;
  if (t.code == kScrimpDLFloat && t.bits == 64) return DType::Float64;
  if (t.code == kScrimpDLInt && t.bits == 64) return DType::Int64;
  if (t.code == kScrimpDLInt && t.bits == 32) return DType::Int32;
  if ((t.code == kScrimpDLUInt || t.code == kScrimpDLBool) && t.bits == 8) return DType::UInt8;
  SCRIMP_CHECK_TYPE(false, name << ": unsupported dtype (DLPack code " << int(t.code) << ", " << int(t.bits)
                                << " bits)");
  return DType::Float32;
}

}  // namespace

DType float_dtype_from_name(const std::string& name, const char* what) {
  if (name == "float32") return DType::Float32;
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  SCRIMP_CHECK_TYPE(false, what << ": expected float32, float16 or bfloat16, got '" << name << "'");
  return DType::Float32;
}

BorrowedTensor::BorrowedTensor(const py::handle& obj, const char* name) {
  SCRIMP_CHECK_TYPE(py::hasattr(obj, "__dlpack__") && py::hasattr(obj, "__dlpack_device__"),
                    name << ": expected a torch.Tensor (any DLPack tensor), got "
                         << std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::tuple dev = obj.attr("__dlpack_device__")();
  const int dev_type = dev[0].cast<int>();
  SCRIMP_CHECK(dev_type == kScrimpDLCPU || dev_type == kScrimpDLCUDA,
               name << ": expected a CPU or CUDA tensor (DLPack device type " << dev_type << ")");
  // stream=-1: no synchronisation; the kernels run on the caller's current stream.
  py::object capsule = dev_type == kScrimpDLCUDA ? obj.attr("__dlpack__")(py::arg("stream") = -1)
                                                 : obj.attr("__dlpack__")();
  PyObject* cap = capsule.ptr();
  SCRIMP_CHECK_TYPE(PyCapsule_IsValid(cap, "dltensor"), name << ": __dlpack__ did not return a 'dltensor' capsule");
  managed_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  // We own it now: renaming stops the capsule's destructor from freeing it a second time.
  PyCapsule_SetName(cap, "used_dltensor");

  try {
    fill_view(name);
  } catch (...) {
    if (managed_->deleter) managed_->deleter(managed_);
    managed_ = nullptr;
    throw;
  }
}

void BorrowedTensor::fill_view(const char* name) {
  const DLTensor& t = managed_->dl_tensor;
  view_.data = static_cast<char*>(t.data) + t.byte_offset;
  view_.device = Device{t.device.device_type == kScrimpDLCUDA ? DeviceType::CUDA : DeviceType::CPU,
                        t.device.device_id};
  view_.dtype = to_dtype(t.dtype, name);
  view_.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides) {
    view_.strides.assign(t.strides, t.strides + t.ndim);
  } else {
    view_.strides.assign(t.ndim, 1);
    for (int d = t.ndim - 2; d >= 0; --d) view_.strides[d] = view_.strides[d + 1] * view_.shape[d + 1];
  }
}

BorrowedTensor::~BorrowedTensor() {
  if (managed_ && managed_->deleter) managed_->deleter(managed_);
}

Span<float> float32_output(const TensorView& v, const char* name, const Device& device) {
  SCRIMP_CHECK_TYPE(v.dtype == DType::Float32, name << ": expected a float32 output, got " << describe(v));
  SCRIMP_CHECK(v.is_contiguous(), name << ": expected a contiguous output, got " << describe(v));
  SCRIMP_CHECK(v.device == device, name << ": expected an output on " << device_name(device) << ", got "
                                        << device_name(v.device));
  return Span<float>(static_cast<float*>(v.data), v.numel());
}

}  // namespace bindings
}  // namespace scrimp
