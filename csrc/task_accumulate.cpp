// pybind11 glue for the per-task masked sums (issue 4): argument checks, dtype dispatch,
// the OpenMP loop of the C++ CPU path, the host twin of the CUDA kernels, and (when built
// with nvcc) the CUDA entry points. The arithmetic is in csrc/include/mtgrpo/task_accumulate.h
// and task_accumulate.cuh.
//
// CPU entry points take numpy arrays (bf16/fp16 values as 16-bit integer views + a value
// type tag, masks as integer views + a mask kind) so every extent is checked here; CUDA
// entry points take raw device pointers, sizes and a cudaStream_t as an integer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "mtgrpo/task_accumulate.h"

namespace py = pybind11;
using namespace mtgrpo::task_acc;
using mtgrpo::fail;

namespace {

// ---- Instruction-set versions of the CPU loops ------------------------------------------
// The loops of task_accumulate.h compiled three times: for the x86-64 baseline (SSE2), for
// AVX2 and for AVX-512 (the wrappers below inline them under a target attribute, so the 32
// lanes of a unit become 2 zmm / 4 ymm registers and the mask compare a k-mask), picked once
// from the CPU's features: one wheel runs on any x86-64. Every version adds the same lanes
// in the same order (adds only, no FMA), so all give the same bits. MTGRPO_CPU_ISA=
// baseline|avx2|avx512 caps the choice (as for the GRPO loss).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTGRPO_TA_DISPATCH 1
#define MTGRPO_TA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")))
#define MTGRPO_TA_AVX2 __attribute__((target("avx2,fma,bmi,bmi2")))
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa pick_isa() {
  const char* env = std::getenv("MTGRPO_CPU_ISA");
  const std::string want = env ? env : "";
#ifdef MTGRPO_TA_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && (want.empty() || want == "avx512")) return Isa::kAvx512;
  if (avx2 && (want.empty() || want == "avx512" || want == "avx2")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa cpu_isa() {
  static const Isa isa = pick_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "baseline");
}

// Blocks [b0, b1) of the plan (each writes its own partial bins) and rows [r0, r1) of the
// backward, one definition per instruction set.
#define MTGRPO_TA_VERSION(NAME, ATTR)                                                                                 \
  template <int VT, int MK>                                                                                           \
  ATTR void blocks_##NAME(const typename ValueTraits<VT>::storage* v, const typename MaskTraits<MK>::storage* m,      \
                          const int64_t* ids, const Plan& p, int64_t b0, int64_t b1,                                  \
                          typename ValueTraits<VT>::acc* part_sums, uint32_t* part_counts) {                          \
    for (int64_t b = b0; b < b1; ++b)                                                                                 \
      block_partials_cpu<VT, MK>(v, m, ids, p, b, part_sums + b * p.tasks, part_counts + b * p.tasks);                \
  }                                                                                                                   \
  template <typename ES, int MK>                                                                                      \
  ATTR void grad_rows_##NAME(ES* out, const typename MaskTraits<MK>::storage* m, const int64_t* ids, const ES* table, \
                             int64_t cols, int64_t r0, int64_t r1) {                                                  \
    for (int64_t n = r0; n < r1; ++n)                                                                                 \
      weighted_grad_row_cpu<ES, MK>(out + n * cols, m + n * cols, cols, table[ids[n]]);                               \
  }

MTGRPO_TA_VERSION(baseline, )
#ifdef MTGRPO_TA_DISPATCH
MTGRPO_TA_VERSION(avx2, MTGRPO_TA_AVX2)
MTGRPO_TA_VERSION(avx512, MTGRPO_TA_AVX512)
#endif
#undef MTGRPO_TA_VERSION

template <int VT, int MK>
auto blocks_fn() {
#ifdef MTGRPO_TA_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return &blocks_avx512<VT, MK>;
    case Isa::kAvx2:
      return &blocks_avx2<VT, MK>;
    default:
      break;
  }
#endif
  return &blocks_baseline<VT, MK>;
}

template <typename ES, int MK>
auto grad_rows_fn() {
#ifdef MTGRPO_TA_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return &grad_rows_avx512<ES, MK>;
    case Isa::kAvx2:
      return &grad_rows_avx2<ES, MK>;
    default:
      break;
  }
#endif
  return &grad_rows_baseline<ES, MK>;
}

// Below this many elements a call runs on the calling thread: waking a second OpenMP
// thread costs more than the work, and on a busy machine it can wait a scheduler tick.
constexpr int64_t kParallelMinElems = 65536;

template <typename F>
void dispatch_value(int value_type, F&& f) {
  switch (value_type) {
    case kF32:
      return f(std::integral_constant<int, kF32>{});
    case kF64:
      return f(std::integral_constant<int, kF64>{});
    case kBF16:
      return f(std::integral_constant<int, kBF16>{});
    case kF16:
      return f(std::integral_constant<int, kF16>{});
    default:
      fail("values: unsupported value type tag ", value_type, " (expected 0=f32, 1=f64, 2=bf16, 3=f16)");
  }
}

int value_bytes(int value_type) {
  switch (value_type) {
    case kF32:
      return 4;
    case kF64:
      return 8;
    case kBF16:
    case kF16:
      return 2;
    default:
      fail("values: unsupported value type tag ", value_type, " (expected 0=f32, 1=f64, 2=bf16, 3=f16)");
  }
}

int mask_bytes(int mask_kind) {
  switch (mask_kind) {
    case kMaskU8:
      return 1;
    case kMaskI16:
    case kMaskH16:
      return 2;
    case kMaskI32:
    case kMaskF32:
      return 4;
    case kMaskI64:
    case kMaskF64:
      return 8;
    default:
      fail("mask: unsupported mask kind ", mask_kind, " (expected 0..6)");
  }
}

void check_tasks(int64_t num_tasks) {
  if (num_tasks < 1 || num_tasks > kMaxTasks)
    fail("num_tasks: expected 1 <= num_tasks <= ", kMaxTasks, ", got ", num_tasks);
}

// values[N,T] (itemsize of the tag), mask[N,T] (itemsize of the kind), task_ids[N] int64 in [0,K).
struct Inputs {
  const void* values = nullptr;
  const void* mask = nullptr;
  const int64_t* task_ids = nullptr;
  int64_t rows = 0, cols = 0;
};

void check_extent(int64_t rows, int64_t cols) {
  if (cols > 0 && rows > kMaxElements / cols)
    fail("values: ", rows, " x ", cols, " elements exceed the supported 2^36");
}

const int64_t* check_task_ids(const py::array& task_ids, int64_t rows, int64_t num_tasks) {
  mtgrpo::ArrayView b = mtgrpo::checked_view(task_ids, "task_ids", 1);
  if (b.kind != 'i' || b.itemsize != 8) fail("task_ids: expected an int64 array");
  if (b.shape[0] != rows) fail("task_ids: expected length ", rows, " (rows of values), got ", b.shape[0]);
  const int64_t* ids = static_cast<const int64_t*>(b.ptr);
  for (int64_t n = 0; n < rows; ++n) {
    if (ids[n] < 0 || ids[n] >= num_tasks)
      fail("task_ids: entry ", n, " is ", ids[n], ", expected a task id in [0, ", num_tasks, ")");
  }
  return ids;
}

Inputs check_inputs(const py::array& values, int value_type, const py::array& mask, int mask_kind,
                    const py::array& task_ids, int64_t num_tasks) {
  check_tasks(num_tasks);
  Inputs in;
  mtgrpo::ArrayView vb = mtgrpo::checked_view(values, "values", 2);
  if (vb.itemsize != value_bytes(value_type))
    fail("values: itemsize ", vb.itemsize, " does not match value type tag ", value_type);
  mtgrpo::ArrayView mb = mtgrpo::checked_view(mask, "mask", 2);
  if (mb.itemsize != mask_bytes(mask_kind))
    fail("mask: itemsize ", mb.itemsize, " does not match mask kind ", mask_kind);
  if (mb.shape[0] != vb.shape[0] || mb.shape[1] != vb.shape[1])
    fail("mask: expected shape [", vb.shape[0], ", ", vb.shape[1], "] like values, got [", mb.shape[0], ", ",
         mb.shape[1], "]");
  in.rows = vb.shape[0];
  in.cols = vb.shape[1];
  check_extent(in.rows, in.cols);
  in.values = vb.ptr;
  in.mask = mb.ptr;
  in.task_ids = check_task_ids(task_ids, in.rows, num_tasks);
  return in;
}

template <typename Acc>
py::array_t<Acc> new_vector(int64_t n) {
  return py::array_t<Acc>(py::ssize_t(n));
}

// Allocates sums[K] / counts[K], dispatches on the value and mask types and calls
// run(VT, MK, values, mask, sums, counts) without the GIL; returns (sums, counts).
template <typename Run>
py::tuple masked_sum_outputs(const Inputs& in, int value_type, int mask_kind, int K, Run&& run) {
  py::object sums_obj, counts_obj;
  dispatch_value(value_type, [&](auto vt) {
    constexpr int VT = decltype(vt)::value;
    using Acc = typename ValueTraits<VT>::acc;
    using VS = typename ValueTraits<VT>::storage;
    auto sums = new_vector<Acc>(K);
    auto counts = new_vector<int64_t>(K);
    Acc* sums_ptr = sums.mutable_data();
    int64_t* counts_ptr = counts.mutable_data();
    dispatch_mask(mask_kind, [&](auto mk) {
      using MS = typename MaskTraits<decltype(mk)::value>::storage;
      py::gil_scoped_release nogil;
      run(vt, mk, static_cast<const VS*>(in.values), static_cast<const MS*>(in.mask), sums_ptr, counts_ptr);
    });
    sums_obj = std::move(sums);
    counts_obj = std::move(counts);
  });
  return py::make_tuple(sums_obj, counts_obj);
}

// The C++ CPU path: blocks of the plan on OpenMP threads, partials combined in block order.
// Each block writes only its own partials, so any schedule gives the same bits; dynamic
// scheduling lets one thread take over the blocks of a thread the OS has descheduled.
py::tuple py_task_masked_sum_cpu(const py::array& values, int value_type, const py::array& mask, int mask_kind,
                                 const py::array& task_ids, int64_t num_tasks, int threads) {
  Inputs in = check_inputs(values, value_type, mask, mask_kind, task_ids, num_tasks);
  const int K = int(num_tasks);
  return masked_sum_outputs(in, value_type, mask_kind, K,
                            [&](auto vt, auto mk, const auto* v, const auto* m, auto* sums_ptr, int64_t* counts_ptr) {
                              constexpr int VT = decltype(vt)::value;
                              constexpr int MK = decltype(mk)::value;
                              using Acc = typename ValueTraits<VT>::acc;
                              const Plan p = make_plan(in.rows, in.cols, K);
                              std::vector<Acc> part_sums(size_t(p.blocks) * K);
                              std::vector<uint32_t> part_counts(size_t(p.blocks) * K);
                              const auto blocks = blocks_fn<VT, MK>();
                              const int nt = threads > 0 ? threads : mtgrpo::num_threads();
                              const bool par = nt > 1 && p.blocks > 1 && in.rows * in.cols >= kParallelMinElems;
                              if (!par) {
                                blocks(v, m, in.task_ids, p, 0, p.blocks, part_sums.data(), part_counts.data());
                              } else {
#ifdef MTGRPO_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
                                for (int64_t b = 0; b < p.blocks; ++b)
                                  blocks(v, m, in.task_ids, p, b, b + 1, part_sums.data(), part_counts.data());
                              }
                              combine_partials_cpu(part_sums.data(), part_counts.data(), p.blocks, K, sums_ptr,
                                                   counts_ptr);
                            });
}

// The host twin of the CUDA kernels (scalar, single thread).
py::tuple py_task_masked_sum_twin(const py::array& values, int value_type, const py::array& mask, int mask_kind,
                                  const py::array& task_ids, int64_t num_tasks) {
  Inputs in = check_inputs(values, value_type, mask, mask_kind, task_ids, num_tasks);
  const int K = int(num_tasks);
  return masked_sum_outputs(in, value_type, mask_kind, K,
                            [&](auto vt, auto mk, const auto* v, const auto* m, auto* sums_ptr, int64_t* counts_ptr) {
                              task_masked_sum_twin<decltype(vt)::value, decltype(mk)::value>(
                                  v, m, in.task_ids, in.rows, in.cols, K, sums_ptr, counts_ptr);
                            });
}

// Backward on the CPU: out[n,t] = mask[n,t] ? table[task_ids[n]] : 0, written in place into
// `out` (a view of the torch gradient), elements of 2, 4 or 8 bytes.
void py_task_weighted_grad_cpu(py::array out, const py::array& mask, int mask_kind, const py::array& task_ids,
                               const py::array& table, int threads) {
  mtgrpo::ArrayView ob = mtgrpo::checked_view(out, "out", 2, true);
  mtgrpo::ArrayView tb = mtgrpo::checked_view(table, "table", 1);
  const int64_t K = tb.shape[0];
  check_tasks(K);
  if (tb.itemsize != ob.itemsize) fail("table: itemsize ", tb.itemsize, " differs from out's ", ob.itemsize);
  mtgrpo::ArrayView mb = mtgrpo::checked_view(mask, "mask", 2);
  if (mb.itemsize != mask_bytes(mask_kind))
    fail("mask: itemsize ", mb.itemsize, " does not match mask kind ", mask_kind);
  if (mb.shape[0] != ob.shape[0] || mb.shape[1] != ob.shape[1])
    fail("mask: expected shape [", ob.shape[0], ", ", ob.shape[1], "] like out, got [", mb.shape[0], ", ", mb.shape[1],
         "]");
  const int64_t rows = ob.shape[0], cols = ob.shape[1];
  const int64_t* ids = check_task_ids(task_ids, rows, K);
  const int nt = threads > 0 ? threads : mtgrpo::num_threads();
  auto run = [&](auto es_tag) {
    using ES = typename decltype(es_tag)::type;
    dispatch_mask(mask_kind, [&](auto mk) {
      constexpr int MK = decltype(mk)::value;
      using MS = typename MaskTraits<MK>::storage;
      py::gil_scoped_release nogil;
      ES* o = static_cast<ES*>(ob.ptr);
      const ES* tab = static_cast<const ES*>(tb.ptr);
      const MS* m = static_cast<const MS*>(mb.ptr);
      const auto grad_rows = grad_rows_fn<ES, MK>();
      if (nt <= 1 || rows < 2 || rows * cols < kParallelMinElems) {
        grad_rows(o, m, ids, tab, cols, 0, rows);
        return;
      }
      // Chunks of about 64K elements (at least one row), as many as needed.
      const int64_t chunk = std::max<int64_t>(1, kParallelMinElems / std::max<int64_t>(cols, 1));
#ifdef MTGRPO_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) grad_rows(o, m, ids, tab, cols, r0, std::min(rows, r0 + chunk));
    });
  };
  switch (ob.itemsize) {
    case 2:
      run(std::common_type<uint16_t>{});
      break;
    case 4:
      run(std::common_type<uint32_t>{});
      break;
    case 8:
      run(std::common_type<uint64_t>{});
      break;
    default:
      fail("out: element size must be 2, 4 or 8 bytes, got ", ob.itemsize);
  }
}

py::dict py_task_masked_sum_plan(int64_t rows, int64_t cols, int64_t num_tasks) {
  check_tasks(num_tasks);
  if (rows < 0 || cols < 0) fail("values: negative extent ", rows, " x ", cols);
  check_extent(rows, cols);
  const Plan p = make_plan(rows, cols, int(num_tasks));
  py::dict d;
  d["seg_len"] = p.seg_len;
  d["segs_per_row"] = p.segs_per_row;
  d["units"] = p.units;
  d["units_per_block"] = p.units_per_block;
  d["blocks"] = p.blocks;
  d["lanes"] = kLanes;
  d["workspace_bytes_f32"] = workspace_bytes(p, 4);
  d["workspace_bytes_f64"] = workspace_bytes(p, 8);
  return d;
}

#ifdef MTGRPO_WITH_CUDA
void py_task_masked_sum_cuda(std::uintptr_t values, int value_type, std::uintptr_t mask, int mask_kind,
                             std::uintptr_t task_ids, int64_t rows, int64_t cols, int64_t num_tasks,
                             std::uintptr_t sums, std::uintptr_t counts, std::uintptr_t workspace,
                             int64_t workspace_bytes, std::intptr_t stream) {
  check_tasks(num_tasks);
  if (rows < 0 || cols < 0) fail("values: negative extent ", rows, " x ", cols);
  check_extent(rows, cols);
  value_bytes(value_type);
  mask_bytes(mask_kind);
  if (rows * cols > 0 && (values == 0 || mask == 0)) fail("values: null device pointer");
  if (rows > 0 && task_ids == 0) fail("task_ids: null device pointer");
  if (sums == 0 || counts == 0 || workspace == 0) fail("sums: null device pointer");
  py::gil_scoped_release nogil;
  cuda::masked_sum(reinterpret_cast<const void*>(values), value_type, reinterpret_cast<const void*>(mask), mask_kind,
                   reinterpret_cast<const int64_t*>(task_ids), rows, cols, int(num_tasks),
                   reinterpret_cast<void*>(sums), reinterpret_cast<int64_t*>(counts),
                   reinterpret_cast<void*>(workspace), workspace_bytes, stream);
}

void py_task_weighted_grad_cuda(std::uintptr_t out, int elem_bytes, std::uintptr_t mask, int mask_kind,
                                std::uintptr_t task_ids, std::uintptr_t table, int64_t rows, int64_t cols,
                                int64_t num_tasks, std::intptr_t stream) {
  check_tasks(num_tasks);
  if (rows < 0 || cols < 0) fail("out: negative extent ", rows, " x ", cols);
  check_extent(rows, cols);
  mask_bytes(mask_kind);
  if (rows * cols > 0 && (out == 0 || mask == 0 || task_ids == 0 || table == 0)) fail("out: null device pointer");
  py::gil_scoped_release nogil;
  cuda::weighted_grad(reinterpret_cast<void*>(out), elem_bytes, reinterpret_cast<const void*>(mask), mask_kind,
                      reinterpret_cast<const int64_t*>(task_ids), reinterpret_cast<const void*>(table), rows, cols,
                      int(num_tasks), stream);
}
#endif

}  // namespace

void register_task_accumulate(py::module_& m) {
  m.attr("TASK_ACC_MAX_TASKS") = kMaxTasks;
  m.attr("TASK_ACC_PARALLEL_MIN_ELEMS") = kParallelMinElems;
  m.def(
      "task_accumulate_cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
      "Instruction set of the task_masked_sum / weighted-grad CPU loops picked for this CPU: 'avx512', 'avx2' or "
      "'baseline' (MTGRPO_CPU_ISA caps it).");
  m.def("task_masked_sum_cpu", &py_task_masked_sum_cpu, py::arg("values"), py::arg("value_type"), py::arg("mask"),
        py::arg("mask_kind"), py::arg("task_ids"), py::arg("num_tasks"), py::arg("threads") = 0,
        "Per-task masked sums on the CPU -> (sums[K] f32|f64, counts[K] int64). Deterministic for any "
        "thread count; bit-identical to the host twin and the CUDA kernels.");
  m.def("task_masked_sum_twin", &py_task_masked_sum_twin, py::arg("values"), py::arg("value_type"), py::arg("mask"),
        py::arg("mask_kind"), py::arg("task_ids"), py::arg("num_tasks"),
        "Host twin of the CUDA kernels: their exact arithmetic, run serially on the CPU.");
  m.def("task_weighted_grad_cpu", &py_task_weighted_grad_cpu, py::arg("out"), py::arg("mask"), py::arg("mask_kind"),
        py::arg("task_ids"), py::arg("table"), py::arg("threads") = 0,
        "out[n,t] = mask[n,t] ? table[task_ids[n]] : 0, in place (2/4/8-byte elements).");
  m.def("task_masked_sum_plan", &py_task_masked_sum_plan, py::arg("rows"), py::arg("cols"), py::arg("num_tasks"),
        "The summation plan (units, blocks, workspace bytes) for an [rows, cols] input and K tasks.");
#ifdef MTGRPO_WITH_CUDA
  m.def("task_masked_sum_cuda", &py_task_masked_sum_cuda, py::arg("values"), py::arg("value_type"), py::arg("mask"),
        py::arg("mask_kind"), py::arg("task_ids"), py::arg("rows"), py::arg("cols"), py::arg("num_tasks"),
        py::arg("sums"), py::arg("counts"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "Enqueue the per-task masked sum kernels (device pointers; stream = cudaStream_t as int).");
  m.def("task_weighted_grad_cuda", &py_task_weighted_grad_cuda, py::arg("out"), py::arg("elem_bytes"), py::arg("mask"),
        py::arg("mask_kind"), py::arg("task_ids"), py::arg("table"), py::arg("rows"), py::arg("cols"),
        py::arg("num_tasks"), py::arg("stream"),
        "Enqueue out[n,t] = mask[n,t] ? table[task_ids[n]] : 0 (device pointers).");
#endif
}
