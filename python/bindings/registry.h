// Each python/bindings/<part>.cpp registers its functions with SCRIMP_BINDINGS(part) { ... }, so a
// new capability adds a file and touches nothing shared. module.cpp calls them in name order.
#pragma once
#include <pybind11/pybind11.h>

namespace scrimp {
namespace bindings {

using RegisterFn = void (*)(pybind11::module_&);
int add_part(const char* name, RegisterFn fn);  // returns a dummy value for static initialisation
void register_all(pybind11::module_& m);

}  // namespace bindings
}  // namespace scrimp

#define SCRIMP_BINDINGS(part)                                                                   \
  static void scrimp_bind_##part(pybind11::module_& m);                                          \
  static const int scrimp_bind_registered_##part = ::scrimp::bindings::add_part(#part, scrimp_bind_##part); \
  static void scrimp_bind_##part(pybind11::module_& m)
