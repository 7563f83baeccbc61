// Span<T>: a pointer with its element count, for the flat index, position and output buffers of the
// C++ API, so that every entry point can check the sizes it is given. Converts from a std::vector
// (a const vector gives Span<const T>); a default or nullptr span means "not given" where an
// argument is optional. Non-owning: the memory must outlive the call.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace scrimp {

template <typename T>
struct Span {
  T* data = nullptr;
  int64_t size = 0;

  Span() = default;
  Span(std::nullptr_t) {}
  Span(T* d, int64_t n) : data(d), size(n) {}
  // Any container with data() and size() (std::vector, std::array), viewed in place.
  template <typename C, typename = std::enable_if_t<std::is_convertible<decltype(std::declval<C&>().data()), T*>::value>,
            typename = decltype(std::declval<C&>().size())>
  Span(C& c) : data(c.data()), size(static_cast<int64_t>(c.size())) {}
  // Span<T> -> Span<const T>.
  template <typename U, typename = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
  Span(Span<U> s) : data(s.data), size(s.size) {}

  bool given() const { return data != nullptr; }
  explicit operator bool() const { return data != nullptr; }
  T& operator[](int64_t i) const { return data[i]; }
};

}  // namespace scrimp
