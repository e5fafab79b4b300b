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

// DLPack, the tensor-exchange C ABI of torch.utils.dlpack.to_dlpack and numpy: the struct layout
// its specification defines (dmlc/dlpack, dlpack.h), declared here. A "dltensor" capsule holds a
// ManagedTensor, a "dltensor_versioned" capsule (DLPack >= 1.0) a ManagedTensorVersioned.
namespace dlpack {
struct Device {
  int32_t device_type;  // 1 = CPU
  int32_t device_id;
};
struct DataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null: compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
struct ManagedTensorVersioned {
  uint32_t major, minor;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;  // bit 0: read-only
  Tensor dl_tensor;
};
}  // namespace dlpack

// The tensor a DLPack capsule holds (null: `h` is no such capsule); `read_only` gets its flag
// (versioned capsules only; a legacy one has none).
inline const dlpack::Tensor* dl_tensor(const pybind11::handle& h, bool* read_only = nullptr) {
  if (read_only != nullptr) *read_only = false;
  if (PyCapsule_IsValid(h.ptr(), "dltensor"))
    return &static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(h.ptr(), "dltensor"))->dl_tensor;
  if (PyCapsule_IsValid(h.ptr(), "dltensor_versioned")) {
    auto* v = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(h.ptr(), "dltensor_versioned"));
    if (read_only != nullptr) *read_only = (v->flags & 1) != 0;
    return &v->dl_tensor;
  }
  return nullptr;
}

// The number of dimensions of a numpy array or a DLPack capsule (-1: neither).
inline int ndim_of(const pybind11::handle& h) {
  if (pybind11::isinstance<pybind11::array>(h))
    return static_cast<int>(pybind11::reinterpret_borrow<pybind11::array>(h).ndim());
  const dlpack::Tensor* t = dl_tensor(h);
  return t == nullptr ? -1 : t->ndim;
}

// checked_view for a numpy array or a DLPack capsule (what the small-call path passes: a torch
// tensor's capsule costs ~0.2 us against ~0.6 us for Tensor.numpy()). The capsule is only read,
// not consumed: its owner frees it. Same checks and messages as for arrays; CPU memory only.
inline ArrayView checked_view(const pybind11::handle& h, const char* name, int ndim, bool writable = false) {
  if (pybind11::isinstance<pybind11::array>(h))
    return checked_view(pybind11::reinterpret_borrow<pybind11::array>(h), name, ndim, writable);
  bool read_only = false;
  const dlpack::Tensor* t = dl_tensor(h, &read_only);
  if (t == nullptr)
    fail(name, ": expected a numpy array or a DLPack capsule (torch.utils.dlpack.to_dlpack), got ",
         Py_TYPE(h.ptr())->tp_name);
  if (writable && read_only) fail(name, ": expected a writable array");
  if (t->device.device_type != 1)
    fail(name, ": expected CPU memory (DLPack device type 1), got device type ", t->device.device_type);
  if (t->ndim != ndim) fail(name, ": expected ", ndim, "-d array, got ", t->ndim, "-d");
  if (ndim > 2) fail(name, ": at most 2-d arrays here");
  if (t->dtype.lanes != 1 || t->dtype.bits == 0 || t->dtype.bits % 8 != 0)
    fail(name, ": expected a scalar dtype of whole bytes, got ", int(t->dtype.bits), " bits x ", t->dtype.lanes);
  ArrayView v{static_cast<char*>(t->data) + t->byte_offset, {1, 1}, t->dtype.bits / 8, 1, 'V'};
  static constexpr char kKinds[] = {'i', 'u', 'f', 'V', 'f', 'c', 'b'};
  if (t->dtype.code < sizeof(kKinds)) v.kind = kKinds[t->dtype.code];
  int64_t expect = 1;  // elements: the stride a C-contiguous layout has at this dimension
  for (int d = ndim - 1; d >= 0; --d) {
    const int64_t n = t->shape[d];
    if (n < 0) fail(name, ": negative extent ", n);
    if (t->strides != nullptr && n > 1 && t->strides[d] != expect) fail(name, ": expected a C-contiguous array");
    v.shape[d] = n;
    v.size *= n;
    expect *= n;
  }
  return v;
}

}  // namespace mtgrpo
