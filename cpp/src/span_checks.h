// Internal: the size check every public entry point applies to a Span argument, with one wording:
// "<name>: expected <n> elements, got <m>".
#pragma once
#include <cstdint>

#include "scrimp/error.h"
#include "scrimp/span.h"

namespace scrimp {

template <typename T>
void check_span(const Span<T>& s, int64_t expected, const char* name) {
  SCRIMP_CHECK(s.size == expected, name << ": expected " << expected << " elements, got " << s.size);
  SCRIMP_CHECK(expected == 0 || s.data != nullptr, name << ": null data pointer");
}

}  // namespace scrimp
