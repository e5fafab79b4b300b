// Glue of the fused LM head + log-prob CPU epilogues (backend "cpu"): argument checks that raise
// ValueError naming the argument, dtype dispatch (float32 / float64 tiles), OpenMP over rows.
// The arithmetic is in mtgrpo/linear_logprobs.h; the GEMMs stay in torch (BLAS) on the Python side.
// Float compares may raise FP exceptions under GCC's default -ftrapping-math, so it will not
// if-convert the selects of exp_f / the running max into blends and leaves every row loop
// scalar ("control flow in loop", -fopt-info-vec). Nothing here reads the FP exception flags;
// without trapping math the exp and backward loops vectorise (4 floats per SSE2 op).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "mtgrpo/linear_logprobs.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"

namespace py = pybind11;
using namespace mtgrpo;

namespace {

// Rows of one tile are independent; static schedule (equal work per row).
template <typename F>
void for_rows(int64_t rows, int64_t cols, F&& f) {
#ifdef MTGRPO_WITH_OPENMP
  // below ~64K elements the fork/join (~5 us) costs more than it saves
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
#endif
  for (int64_t i = 0; i < rows; ++i) f(i);
}

py::buffer_info vec(const py::array& a, const char* name, int64_t n, size_t item) {
  auto b = checked_buffer(a, name, 1);
  if (b.shape[0] != n) fail(name, ": expected ", n, " elements, got ", b.shape[0]);
  if (static_cast<size_t>(b.itemsize) != item) fail(name, ": expected itemsize ", item, ", got ", b.itemsize);
  return b;
}

const int64_t* local_ids(const py::array& a, int64_t rows, int64_t cols) {
  auto b = vec(a, "local_ids", rows, sizeof(int64_t));
  if (b.format != py::format_descriptor<int64_t>::format() && b.format != "l" && b.format != "q")
    fail("local_ids: expected int64, got format '", b.format, "'");
  const auto* p = static_cast<const int64_t*>(b.ptr);
  for (int64_t i = 0; i < rows; ++i)
    if (p[i] < -1 || p[i] >= cols) fail("local_ids: expected values in [-1, ", cols, "), got ", p[i], " at row ", i);
  return p;
}

template <typename T>
void fwd_impl(py::array z, py::array local, double scale, py::array m, py::array s, py::object t, py::array tgt) {
  auto zb = checked_buffer(z, "z", 2);
  const int64_t rows = zb.shape[0], cols = zb.shape[1];
  const int64_t* loc = local_ids(local, rows, cols);
  const bool with_entropy = !t.is_none();
  ll::RowStats<T> st{static_cast<T*>(vec(m, "m", rows, sizeof(T)).ptr),
                     static_cast<T*>(vec(s, "s", rows, sizeof(T)).ptr),
                     with_entropy ? static_cast<T*>(vec(t.cast<py::array>(), "t", rows, sizeof(T)).ptr) : nullptr,
                     static_cast<T*>(vec(tgt, "tgt", rows, sizeof(T)).ptr)};
  const T* zp = static_cast<const T*>(zb.ptr);
  const T sc = static_cast<T>(scale);
  py::gil_scoped_release nogil;
  for_rows(rows, cols, [&](int64_t i) { ll::fwd_row<T>(zp + i * cols, cols, loc[i], sc, with_entropy, i, st); });
}

template <typename T>
void bwd_impl(py::array z, py::array local, double scale, py::array lse, py::object ent, py::array gl, py::object ge) {
  auto zb = checked_buffer(z, "z", 2);
  if (zb.readonly) fail("z: expected a writable array");
  const int64_t rows = zb.shape[0], cols = zb.shape[1];
  const int64_t* loc = local_ids(local, rows, cols);
  const bool with_entropy = !ge.is_none();
  if (with_entropy == ent.is_none()) fail("ent: expected an array exactly when ge is given");
  const T* lp = static_cast<const T*>(vec(lse, "lse", rows, sizeof(T)).ptr);
  const T* gp = static_cast<const T*>(vec(gl, "gl", rows, sizeof(T)).ptr);
  const T* ep = with_entropy ? static_cast<const T*>(vec(ent.cast<py::array>(), "ent", rows, sizeof(T)).ptr) : nullptr;
  const T* gep = with_entropy ? static_cast<const T*>(vec(ge.cast<py::array>(), "ge", rows, sizeof(T)).ptr) : nullptr;
  T* zp = static_cast<T*>(zb.ptr);
  const T sc = static_cast<T>(scale);
  py::gil_scoped_release nogil;
  for_rows(rows, cols, [&](int64_t i) {
    ll::BwdRow<T> r{lp[i], ep ? ep[i] : T(0), gp[i], gep ? gep[i] : T(0)};
    ll::bwd_row<T>(zp + i * cols, cols, loc[i], sc, with_entropy, r);
  });
}

bool is_f64(const py::array& z) {
  const auto k = z.dtype();
  if (k.is(py::dtype::of<float>())) return false;
  if (k.is(py::dtype::of<double>())) return true;
  fail("z: expected a float32 or float64 array, got dtype '", std::string(py::str(k)), "'");
}

void check_scale(double scale) {
  if (!(scale > 0) || !std::isfinite(scale)) fail("scale: expected a finite number > 0, got ", scale);
}

void linear_logprobs_fwd_tile(py::array z, py::array local, double scale, py::array m, py::array s, py::object t,
                              py::array tgt) {
  check_scale(scale);
  if (is_f64(z))
    fwd_impl<double>(z, local, scale, m, s, t, tgt);
  else
    fwd_impl<float>(z, local, scale, m, s, t, tgt);
}

void linear_logprobs_bwd_tile(py::array z, py::array local, double scale, py::array lse, py::object ent, py::array gl,
                              py::object ge) {
  check_scale(scale);
  if (is_f64(z))
    bwd_impl<double>(z, local, scale, lse, ent, gl, ge);
  else
    bwd_impl<float>(z, local, scale, lse, ent, gl, ge);
}

}  // namespace

void register_linear_logprobs(py::module_& m) {
  m.def("linear_logprobs_fwd_tile", &linear_logprobs_fwd_tile, py::arg("z"), py::arg("local_ids"), py::arg("scale"),
        py::arg("m"), py::arg("s"), py::arg("t"), py::arg("tgt"),
        "Merge one [rows, cols] tile of raw logits (z = scale * tile) into the running per-row max m, "
        "sum s = sum e^(z-m), entropy numerator t (None: no entropy) and target logit tgt "
        "(local_ids: the target's column in this tile, -1 when outside). In place.");
  m.def("linear_logprobs_bwd_tile", &linear_logprobs_bwd_tile, py::arg("z"), py::arg("local_ids"), py::arg("scale"),
        py::arg("lse"), py::arg("ent"), py::arg("gl"), py::arg("ge"),
        "Overwrite one tile of raw logits with dL/d(raw logits) = scale * (gl onehot - p (gl + ge (log p + ent))); "
        "ent/ge None without entropy.");
}
