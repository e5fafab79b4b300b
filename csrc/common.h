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

// The same checks as checked_buffer, read straight from the numpy array object (no buffer
// protocol: a buffer request costs ~0.3 us per array, most of a small call's binding time).
// `writable`: the array must accept writes (outputs).
struct ArrayView {
  void* ptr;
  pybind11::ssize_t shape[2];
  pybind11::ssize_t itemsize;
  pybind11::ssize_t size;
  char kind;  // numpy's dtype kind: 'f' float, 'i' signed int, 'u' unsigned, 'b' bool
};

inline ArrayView checked_view(const pybind11::array& a, const char* name, int ndim, bool writable = false) {
  if (a.ndim() != ndim) fail(name, ": expected ", ndim, "-d array, got ", a.ndim(), "-d");
  if (ndim > 2) fail(name, ": at most 2-d arrays here");
  if (writable && !a.writeable()) fail(name, ": expected a writable array");
  // numpy's own C-contiguity flag (what a buffer request reports canonical strides for): size-1
  // and empty dimensions do not count, as in checked_buffer
  if (!(a.flags() & pybind11::array::c_style)) fail(name, ": expected a C-contiguous array");
  ArrayView v{const_cast<void*>(a.data()), {1, 1}, a.itemsize(), a.size(), a.dtype().kind()};
  for (int d = 0; d < ndim; ++d) v.shape[d] = a.shape(d);
  return v;
}

}  // namespace mtgrpo
