// The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared here from the spec so
// the core depends on neither torch nor a dlpack package. Only the unversioned capsule is used.
#pragma once
#include <cstdint>

extern "C" {

enum ScrimpDLDeviceType : int32_t {
  kScrimpDLCPU = 1,
  kScrimpDLCUDA = 2,
  kScrimpDLCUDAHost = 3,
  kScrimpDLCUDAManaged = 13,
};

enum ScrimpDLDataTypeCode : uint8_t {
  kScrimpDLInt = 0,
  kScrimpDLUInt = 1,
  kScrimpDLFloat = 2,
  kScrimpDLBfloat = 4,
  kScrimpDLBool = 6,
};

struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};

struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};

struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

}  // extern "C"
