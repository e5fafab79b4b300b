// CUDA glue for the per-task masked sums: dtype dispatch, launches, status checks.
// The kernels and their host twin are in csrc/include/mtgrpo/task_accumulate.cuh.
// No pybind11 here: csrc/task_accumulate.cpp binds these functions (raw pointers, sizes and
// a cudaStream_t passed as an integer), so the extension never links libtorch.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mtgrpo/task_accumulate.h"

namespace mtgrpo {
namespace task_acc {
namespace cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    // Clear a sticky launch error so the next call does not report it again.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

template <int VT, int MK>
void launch_masked_sum(const void* values, const void* mask, const int64_t* task_ids, const Plan& p, void* sums,
                       int64_t* counts, void* workspace, cudaStream_t stream) {
  using VS = typename ValueTraits<VT>::storage;
  using MS = typename MaskTraits<MK>::storage;
  using Acc = typename ValueTraits<VT>::acc;
  Acc* part_sums = static_cast<Acc*>(workspace);
  uint32_t* part_counts = reinterpret_cast<uint32_t*>(part_sums + p.blocks * p.tasks);
  const size_t smem = partial_kernel_smem_bytes(p.tasks, int(sizeof(Acc)));
  auto* kernel = &task_masked_sum_partial_kernel<VT, MK>;
  if (smem > 48 * 1024) {  // fp64 bins for K > ~3000 need the opt-in shared memory
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "task_masked_sum_partial_kernel (cudaFuncSetAttribute)");
  }
  kernel<<<dim3(unsigned(p.blocks)), dim3(kWarpsPerBlock * kLanes), smem, stream>>>(
      static_cast<const VS*>(values), static_cast<const MS*>(mask), task_ids, p, part_sums, part_counts);
  check(cudaGetLastError(), "task_masked_sum_partial_kernel (launch)");
  const int threads = 128;
  const int grid = (p.tasks + threads - 1) / threads;
  task_masked_sum_combine_kernel<Acc>
      <<<grid, threads, 0, stream>>>(part_sums, part_counts, p.blocks, p.tasks, static_cast<Acc*>(sums), counts);
  check(cudaGetLastError(), "task_masked_sum_combine_kernel (launch)");
}

template <typename ES, int MK>
void launch_weighted_grad(void* out, const void* mask, const int64_t* task_ids, const void* table, int64_t rows,
                          int64_t cols, int tasks, cudaStream_t stream) {
  using MS = typename MaskTraits<MK>::storage;
  const int64_t total = rows * cols;
  if (total == 0) return;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "task_weighted_grad_kernel (cudaGetDevice)");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "task_weighted_grad_kernel (cudaDeviceGetAttribute)");
  const int threads = 256;
  int64_t grid = (total + threads - 1) / threads;
  const int64_t cap = int64_t(sms) * 16;  // enough resident warps to saturate memory
  if (grid > cap) grid = cap;
  task_weighted_grad_kernel<ES, MK><<<unsigned(grid), threads, 0, stream>>>(
      static_cast<ES*>(out), static_cast<const MS*>(mask), task_ids, static_cast<const ES*>(table), rows, cols, tasks);
  check(cudaGetLastError(), "task_weighted_grad_kernel (launch)");
}

}  // namespace

void masked_sum(const void* values, int value_type, const void* mask, int mask_kind, const int64_t* task_ids,
                int64_t rows, int64_t cols, int tasks, void* sums, int64_t* counts, void* workspace, int64_t ws_bytes,
                std::intptr_t stream_int) {
  if (tasks < 1 || tasks > kMaxTasks) throw std::invalid_argument("num_tasks: expected 1 <= num_tasks <= 4096");
  if (rows < 0 || cols < 0) throw std::invalid_argument("values: negative extent");
  const Plan p = make_plan(rows, cols, tasks);
  const int acc_bytes = value_type == kF64 ? 8 : 4;
  if (ws_bytes < workspace_bytes(p, acc_bytes))
    throw std::invalid_argument("workspace: too small for task_masked_sum_partial_kernel");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  dispatch_mask(mask_kind, [&](auto mk) {
    constexpr int MK = decltype(mk)::value;
    switch (value_type) {
      case kF32:
        return launch_masked_sum<kF32, MK>(values, mask, task_ids, p, sums, counts, workspace, stream);
      case kF64:
        return launch_masked_sum<kF64, MK>(values, mask, task_ids, p, sums, counts, workspace, stream);
      case kBF16:
        return launch_masked_sum<kBF16, MK>(values, mask, task_ids, p, sums, counts, workspace, stream);
      case kF16:
        return launch_masked_sum<kF16, MK>(values, mask, task_ids, p, sums, counts, workspace, stream);
      default:
        throw std::invalid_argument("values: unsupported value type " + std::to_string(value_type));
    }
  });
}

void weighted_grad(void* out, int elem_bytes, const void* mask, int mask_kind, const int64_t* task_ids,
                   const void* table, int64_t rows, int64_t cols, int tasks, std::intptr_t stream_int) {
  if (tasks < 1 || tasks > kMaxTasks) throw std::invalid_argument("num_tasks: expected 1 <= num_tasks <= 4096");
  if (rows < 0 || cols < 0) throw std::invalid_argument("out: negative extent");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  dispatch_mask(mask_kind, [&](auto mk) {
    constexpr int MK = decltype(mk)::value;
    switch (elem_bytes) {
      case 2:
        return launch_weighted_grad<uint16_t, MK>(out, mask, task_ids, table, rows, cols, tasks, stream);
      case 4:
        return launch_weighted_grad<uint32_t, MK>(out, mask, task_ids, table, rows, cols, tasks, stream);
      case 8:
        return launch_weighted_grad<uint64_t, MK>(out, mask, task_ids, table, rows, cols, tasks, stream);
      default:
        throw std::invalid_argument("out: element size must be 2, 4 or 8 bytes");
    }
  });
}

}  // namespace cuda
}  // namespace task_acc
}  // namespace mtgrpo
