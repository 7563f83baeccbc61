// scrimp::Error and SCRIMP_CHECK: every public function reports bad input by throwing, never by
// aborting. The binding layer maps ErrorKind to ValueError / TypeError / RuntimeError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace scrimp {

enum class ErrorKind { Value, Type, Runtime };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg, const char* file, int line);
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorKind kind, const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace scrimp

// SCRIMP_CHECK(cond, "message " << value): a ValueError-class failure with file:line.
#define SCRIMP_CHECK_KIND(kind, cond, msg)                                            \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::ostringstream scrimp_oss_;                                                \
      scrimp_oss_ << msg;                                                            \
      ::scrimp::detail::throw_error((kind), __FILE__, __LINE__, scrimp_oss_.str());  \
    }                                                                                \
  } while (0)
#define SCRIMP_CHECK(cond, msg) SCRIMP_CHECK_KIND(::scrimp::ErrorKind::Value, cond, msg)
#define SCRIMP_CHECK_TYPE(cond, msg) SCRIMP_CHECK_KIND(::scrimp::ErrorKind::Type, cond, msg)
#define SCRIMP_FAIL(msg) SCRIMP_CHECK_KIND(::scrimp::ErrorKind::Runtime, false, msg)
