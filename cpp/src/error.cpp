#include "scrimp/error.h"

#include <cstring>

namespace scrimp {

namespace {
std::string with_location(const std::string& msg, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::ostringstream oss;
  oss << msg << " [" << (base ? base + 1 : file) << ":" << line << "]";
  return oss.str();
}
}  // namespace

Error::Error(ErrorKind kind, const std::string& msg, const char* file, int line)
    : std::runtime_error(with_location(msg, file, line)), kind_(kind) {}

namespace detail {
void throw_error(ErrorKind kind, const char* file, int line, const std::string& msg) {
  throw Error(kind, msg, file, line);
}
}  // namespace detail

}  // namespace scrimp
