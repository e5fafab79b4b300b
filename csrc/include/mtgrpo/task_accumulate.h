// Per-task masked sums and the backward of a per-task weighted sum: the C++ CPU path and
// the declarations of the CUDA entry points. Framework-free (raw pointers and sizes).
//
// The CPU path follows the same plan as the CUDA kernels (task_accumulate.cuh): the same
// units, the same 32-lane order inside a unit, the same block partials combined in block
// order. It is written so the compiler vectorises the 32 lanes (one lane per SIMD slot) and
// the glue runs the blocks on OpenMP threads; each block writes only its own partial bins,
// so the result does not depend on the number of threads or their schedule, and it is
// bit-identical to the host twin and the CUDA kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mtgrpo/task_accumulate.cuh"

// The loops below are forced inline into their callers: csrc/task_accumulate.cpp calls them
// from functions compiled for AVX2 and AVX-512, and an out-of-line copy would be baseline code.
#if defined(__GNUC__)
#define MTGRPO_TA_INLINE inline __attribute__((always_inline))
#else
#define MTGRPO_TA_INLINE inline
#endif

namespace mtgrpo {
namespace task_acc {

// Calls f(std::integral_constant<int, MK>{}) for the runtime mask kind (shared by the CPU
// glue and the CUDA launcher).
template <typename F>
void dispatch_mask(int mask_kind, F&& f) {
  switch (mask_kind) {
    case kMaskU8:
      return f(std::integral_constant<int, kMaskU8>{});
    case kMaskI16:
      return f(std::integral_constant<int, kMaskI16>{});
    case kMaskI32:
      return f(std::integral_constant<int, kMaskI32>{});
    case kMaskI64:
      return f(std::integral_constant<int, kMaskI64>{});
    case kMaskH16:
      return f(std::integral_constant<int, kMaskH16>{});
    case kMaskF32:
      return f(std::integral_constant<int, kMaskF32>{});
    case kMaskF64:
      return f(std::integral_constant<int, kMaskF64>{});
    default:
      throw std::invalid_argument("mask: unsupported mask kind " + std::to_string(mask_kind) + " (expected 0..6)");
  }
}

// Sum and count of one unit (len <= kSegLen elements), 32 strided lanes then the fold.
template <int VT, int MK>
MTGRPO_TA_INLINE void unit_sum_cpu(const typename ValueTraits<VT>::storage* __restrict v,
                                   const typename MaskTraits<MK>::storage* __restrict m, int64_t len,
                                   typename ValueTraits<VT>::acc* sum, uint32_t* cnt) {
  using Acc = typename ValueTraits<VT>::acc;
  Acc lanes[kLanes];
  uint32_t c = 0;
  if (len < kLanes) {
    // Short unit (e.g. T = 1 statistics rows): lanes >= len hold +0. A lane sum is never
    // -0 (it starts at +0, and a rounded sum is -0 only when both terms are), so adding a
    // +0 lane is exact and the fold can start at the smallest power of two >= len: the
    // same bits as the full 32-lane fold, without its 31 adds per unit.
    int width = 1;
    while (width < len) width <<= 1;
    for (int l = 0; l < width; ++l) {
      Acc s = Acc(0);
      if (l < len) {
        const auto mi = m[l];
        s += masked_value<VT, MK>(v[l], mi);
        c += uint32_t(MaskTraits<MK>::set(mi));
      }
      lanes[l] = s;
    }
    for (int off = width / 2; off >= 1; off >>= 1)
      for (int l = 0; l < off; ++l) lanes[l] += lanes[l + off];
    *sum = lanes[0];
    *cnt = c;
    return;
  }
  for (int l = 0; l < kLanes; ++l) lanes[l] = Acc(0);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const auto mi = m[i + l];
      lanes[l] += masked_value<VT, MK>(v[i + l], mi);
      c += uint32_t(MaskTraits<MK>::set(mi));
    }
  }
  for (int l = 0; i + l < len; ++l) {
    const auto mi = m[i + l];
    lanes[l] += masked_value<VT, MK>(v[i + l], mi);
    c += uint32_t(MaskTraits<MK>::set(mi));
  }
  *sum = fold_lanes(lanes);
  *cnt = c;
}

// Step 1-3 of the plan for block b: writes bins[K] and cbins[K] (this block's partials).
template <int VT, int MK>
MTGRPO_TA_INLINE void block_partials_cpu(const typename ValueTraits<VT>::storage* values,
                                         const typename MaskTraits<MK>::storage* mask, const int64_t* task_ids,
                                         const Plan& p, int64_t b, typename ValueTraits<VT>::acc* bins,
                                         uint32_t* cbins) {
  using Acc = typename ValueTraits<VT>::acc;
  for (int k = 0; k < p.tasks; ++k) {
    bins[k] = Acc(0);
    cbins[k] = 0u;
  }
  const int64_t u0 = b * p.units_per_block;
  const int64_t u1 = std::min(p.units, u0 + p.units_per_block);
  for (int64_t u = u0; u < u1; ++u) {
    int64_t row, off, len;
    if (p.segs_per_row == 1) {  // one unit per row (T <= kSegLen = 1024): no division
      row = u;
      off = u * p.cols;
      len = p.cols;
    } else {
      unit_extent(p, u, &row, &off, &len);
    }
    Acc s;
    uint32_t c;
    unit_sum_cpu<VT, MK>(values + off, mask + off, len, &s, &c);
    const int64_t k = task_ids[row];
    if (k < 0 || k >= p.tasks) continue;  // validated by the glue before this runs
    bins[k] += s;
    cbins[k] += c;
  }
}

// Step 4: sums[k] = sum over b of partial[b][k] in block order (the loop over k vectorises;
// each k still sees the blocks in order 0, 1, 2, ...).
template <typename Acc>
inline void combine_partials_cpu(const Acc* part_sums, const uint32_t* part_counts, int64_t blocks, int tasks,
                                 Acc* sums, int64_t* counts) {
  for (int k = 0; k < tasks; ++k) {
    sums[k] = Acc(0);
    counts[k] = 0;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const Acc* ps = part_sums + b * tasks;
    const uint32_t* pc = part_counts + b * tasks;
    for (int k = 0; k < tasks; ++k) {
      sums[k] += ps[k];
      counts[k] += pc[k];
    }
  }
}

// One row of the backward: out[t] = mask[t] ? val : 0 (ES: the output element's bits).
template <typename ES, int MK>
MTGRPO_TA_INLINE void weighted_grad_row_cpu(ES* __restrict out, const typename MaskTraits<MK>::storage* __restrict m,
                                            int64_t cols, ES val) {
  for (int64_t t = 0; t < cols; ++t) out[t] = MaskTraits<MK>::set(m[t]) ? val : ES(0);
}

// ---- CUDA entry points (defined in csrc/task_accumulate.cu when built with nvcc) ---------
// Pointers are device pointers; `stream` is a cudaStream_t passed as an integer. They
// enqueue work and return without synchronising; a failed CUDA call throws
// std::runtime_error naming the kernel and the CUDA error.
namespace cuda {
// sums: Acc[K] (float, or double for kF64 values); counts: int64[K]; workspace: at least
// workspace_bytes(make_plan(N, T, K), sizeof(Acc)) bytes.
void masked_sum(const void* values, int value_type, const void* mask, int mask_kind, const int64_t* task_ids,
                int64_t rows, int64_t cols, int tasks, void* sums, int64_t* counts, void* workspace,
                int64_t workspace_bytes, std::intptr_t stream);
// out[N,T] and table[K] hold elements of elem_bytes (2, 4 or 8) bytes.
void weighted_grad(void* out, int elem_bytes, const void* mask, int mask_kind, const int64_t* task_ids,
                   const void* table, int64_t rows, int64_t cols, int tasks, std::intptr_t stream);
}  // namespace cuda

}  // namespace task_acc
}  // namespace mtgrpo
