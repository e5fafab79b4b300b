// The only PYBIND11_MODULE of the project. Each op's glue file defines a
// register_<op>(py::module_&) function that adds its entry points; this file
// only collects them and the build description.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

void register_grpo_loss(py::module_& m);
void register_task_accumulate(py::module_& m);
void register_sampler(py::module_& m);
void register_linear_logprobs(py::module_& m);
void register_cpu_cache(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtgrpo_core native kernels (C++ CPU path, CUDA kernels, sampler core)";
  py::dict info;
#ifdef MTGRPO_VERSION
  info["version"] = MTGRPO_VERSION;
#endif
  info["compiler"] = MTGRPO_CXX_COMPILER;
#ifdef MTGRPO_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef MTGRPO_WITH_CUDA
  info["cuda_kernels_compiled"] = true;
  info["cuda_archs"] = MTGRPO_CUDA_ARCHS;
#else
  info["cuda_kernels_compiled"] = false;
  info["cuda_archs"] = "";
#endif
  m.attr("BUILD_INFO") = info;
  m.def("num_threads", &mtgrpo::num_threads, "OpenMP threads the CPU kernels use");

  register_grpo_loss(m);
  register_task_accumulate(m);
  register_sampler(m);
  register_linear_logprobs(m);
  register_cpu_cache(m);
}
