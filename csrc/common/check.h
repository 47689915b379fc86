// Argument checks that throw (never abort): std::invalid_argument becomes ValueError in Python,
// std::runtime_error becomes RuntimeError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace pyllmops {

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void throw_invalid(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  throw std::invalid_argument(os.str());
}

template <typename... Args>
[[noreturn]] void throw_runtime(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  throw std::runtime_error(os.str());
}

}  // namespace pyllmops

// PYLLMOPS_CHECK(cond, "message parts", value, ...): throws ValueError naming what failed.
#define PYLLMOPS_CHECK(cond, ...)                                                    \
  do {                                                                               \
    if (!(cond)) ::pyllmops::throw_invalid("pyllmops._C: ", __VA_ARGS__);           \
  } while (0)
