// scrimp._C: converts and checks, nothing else. Tensors arrive through DLPack (zero-copy, CPU or
// CUDA); outputs are allocated by the Python layer (torch) and written in place here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "registry.h"
#include "scrimp/build_info.h"
#include "scrimp/error.h"

namespace py = pybind11;

namespace scrimp {
namespace bindings {

namespace {
std::vector<std::pair<std::string, RegisterFn>>& parts() {
  static std::vector<std::pair<std::string, RegisterFn>> all;
  return all;
}
}  // namespace

int add_part(const char* name, RegisterFn fn) {
  parts().emplace_back(name, fn);
  return 0;
}

void register_all(py::module_& m) {
  auto all = parts();
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& part : all) part.second(m);
}

}  // namespace bindings
}  // namespace scrimp

namespace {

py::dict build_info() {
  const scrimp::BuildInfo info = scrimp::build_info();
  py::dict d;
  d["version"] = info.version;
  d["cuda_compiled"] = info.cuda_compiled;
  d["cuda_architectures"] = info.cuda_architectures;
  d["cutlass"] = info.cutlass;
  d["cuda_device_usable"] = info.cuda_device_usable;
  d["cuda_device_count"] = info.cuda_device_count;
  d["cuda_status"] = info.cuda_status;
  d["cpu_simd"] = info.cpu_simd;
  d["openmp_threads"] = info.openmp_threads;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "scrimp's compiled core (see scrimp.* for the documented Python API)";

  // scrimp::Error -> ValueError / TypeError / RuntimeError with the same message.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const scrimp::Error& e) {
      switch (e.kind()) {
        case scrimp::ErrorKind::Value: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case scrimp::ErrorKind::Type: PyErr_SetString(PyExc_TypeError, e.what()); return;
        case scrimp::ErrorKind::Runtime: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    }
  });

  m.def("build_info", &build_info, "What this build contains and what the machine offers.");
  m.def("cpu_simd_level", &scrimp::cpu_simd_level, "The CPU SIMD path the kernels dispatch to now.");
  scrimp::bindings::register_all(m);
}
