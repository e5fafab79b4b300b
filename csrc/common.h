// Helpers shared by the glue files (pybind11 side): argument checks that raise
// ValueError (std::invalid_argument) naming the argument, and buffer access.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef MTGRPO_WITH_OPENMP
#include <omp.h>
#endif

namespace mtgrpo {

inline int num_threads() {
#ifdef MTGRPO_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

// Checks that `a` is a C-contiguous array of `ndim` dims; returns its info.
inline pybind11::buffer_info checked_buffer(const pybind11::array& a, const char* name, int ndim) {
  pybind11::buffer_info b = a.request();
  if (b.ndim != ndim) fail(name, ": expected ", ndim, "-d array, got ", b.ndim, "-d");
  pybind11::ssize_t stride = b.itemsize;
  for (int d = ndim - 1; d >= 0; --d) {
    if (b.shape[d] > 1 && b.strides[d] != stride) fail(name, ": expected a C-contiguous array");
    stride *= b.shape[d];
  }
  return b;
}

}  // namespace mtgrpo
