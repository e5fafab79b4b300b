// Per-task masked sums: the arithmetic shared by the CUDA kernels, the C++ CPU path and
// the host "twin" of the kernels. Framework-free (raw pointers and sizes; no torch, no
// pybind11). This header compiles with a plain C++17 compiler: the __host__ __device__
// helpers, the launch plan and the host twin are always visible; the kernels themselves
// only when nvcc compiles it (__CUDACC__).
//
// What it computes, for values[N,T], mask[N,T], task_ids[N] in [0,K):
//   sums[k]   = sum over rows n with task_ids[n] == k, columns t with mask[n,t] != 0, of values[n,t]
//   counts[k] = number of such (n, t)
// accumulated in float32 (float64 for float64 values).
//
// The summation order is fixed by a plan that depends only on (N, T, K), so every backend
// that follows it (CUDA kernels, C++ CPU path, host twin) returns the same bits, run to run
// and whatever the number of CPU threads:
//   1. each row is cut into segments of at most kSegLen = 1024 columns; a "unit" is one
//      (row, segment); units are numbered row-major (u = n * segs_per_row + s).
//   2. a unit is reduced by kLanes = 32 lanes (one CUDA warp): lane l adds the elements
//      l, l+32, l+64, ... of the unit in order, then the 32 lane sums are folded by the
//      shuffle tree lane[l] += lane[l+off] for off = 16, 8, 4, 2, 1.
//   3. "block" b owns the units [b*upb, (b+1)*upb) and adds their sums, in unit order, to
//      its K bins (shared memory on the GPU), giving partial[b][k]. upb is a multiple of
//      kWarpsPerBlock = 8, so every tile of 8 units a CUDA block reduces at once is full
//      (only the last block of the grid can have a short tile): no warp idles.
//   4. sums[k] = partial[0][k] + partial[1][k] + ... in block order.
// No floating-point atomics anywhere. Counts are integers (exact in any order).
// Cost: one read of values and mask (N*T*(sizeof(value)+sizeof(mask)) bytes), N*T adds;
// plus blocks*K partials (blocks <= max(64, min(1024, 2^20/K))).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define MTGRPO_HD __host__ __device__ __forceinline__
#else
#define MTGRPO_HD inline
#endif

namespace mtgrpo {
namespace task_acc {

constexpr int kMaxTasks = 4096;  // the API's range of K
constexpr int kLanes = 32;       // lanes per unit reduction (one warp)
// Columns per unit. 1024 (32 elements per lane) rather than 2048: at N=64, T=32768 it gives
// 2048 units = 256 blocks of 8 busy warps (15.5 warps per SM on 132 SMs) instead of 128; at
// N=1, T=8M it gives 8192 units, still 1024 blocks.
constexpr int64_t kSegLen = 1024;
constexpr int64_t kMinBlockElems = 8192;            // below this a block is mostly launch overhead
constexpr int64_t kMaxPartials = int64_t(1) << 20;  // blocks*K partial bins at most (8 MB fp64)
constexpr int64_t kMaxBlocksHi = 1024, kMaxBlocksLo = 64;
constexpr int64_t kMaxElements = int64_t(1) << 36;  // keeps a block's count below 2^31
constexpr int kWarpsPerBlock = 8;                   // CUDA: 256 threads, 8 units reduced at a time

// Value storage types (the tag passed from Python).
enum ValueType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };
// Mask storage kinds: an element is "set" when it is nonzero (floats: +-0 are unset).
enum MaskKind : int { kMaskU8 = 0, kMaskI16 = 1, kMaskI32 = 2, kMaskI64 = 3, kMaskH16 = 4, kMaskF32 = 5, kMaskF64 = 6 };

struct Plan {
  int64_t rows = 0, cols = 0;
  int64_t seg_len = 0, segs_per_row = 0;  // columns per unit, units per row
  int64_t units = 0, units_per_block = 1, blocks = 1;
  int tasks = 1;
};

// The order of summation: a pure function of (N, T, K). See the file comment.
MTGRPO_HD Plan make_plan(int64_t rows, int64_t cols, int tasks) {
  Plan p;
  p.rows = rows;
  p.cols = cols;
  p.tasks = tasks;
  p.seg_len = cols < kSegLen ? cols : kSegLen;
  p.segs_per_row = cols == 0 ? 0 : (cols + kSegLen - 1) / kSegLen;
  p.units = rows * p.segs_per_row;
  int64_t max_blocks = kMaxPartials / (tasks > 0 ? tasks : 1);
  max_blocks = max_blocks < kMaxBlocksLo ? kMaxBlocksLo : (max_blocks > kMaxBlocksHi ? kMaxBlocksHi : max_blocks);
  const int64_t seg = p.seg_len > 0 ? p.seg_len : 1;
  int64_t upb = (kMinBlockElems + seg - 1) / seg;
  const int64_t spread = (p.units + max_blocks - 1) / max_blocks;
  if (spread > upb) upb = spread;
  // Whole tiles: a CUDA block reduces kWarpsPerBlock units at a time (one per warp), so a
  // block of 4 units (the old 8192-element minimum over 2048-column units) left 4 of its 8
  // warps idle. Rounding up keeps blocks <= max_blocks (fewer, fuller blocks).
  upb = (upb + kWarpsPerBlock - 1) / kWarpsPerBlock * kWarpsPerBlock;
  p.units_per_block = upb;
  p.blocks = p.units == 0 ? 1 : (p.units + upb - 1) / upb;
  return p;
}

// ---- element access (identical on host and device: integer bit manipulation only) ------
MTGRPO_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MTGRPO_HD float bf16_to_float(uint16_t h) {
  return bits_to_float(uint32_t(h) << 16);
}

// IEEE binary16 -> binary32, exact (subnormals as mant * 2^-24, also exact). The device
// uses the hardware conversion (cvt.f32.f16, also exact, so the same bits as the host
// code below): the integer version costs ~15 instructions and, unrolled 8 times, made
// ptxas spill in the fp16 sum kernels.
MTGRPO_HD float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float mag = float(mant) * 5.9604644775390625e-08f;  // 2^-24
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

template <int VT>
struct ValueTraits;
template <>
struct ValueTraits<kF32> {
  using storage = float;
  using acc = float;
  static MTGRPO_HD acc load(storage x) { return x; }
};
template <>
struct ValueTraits<kF64> {
  using storage = double;
  using acc = double;
  static MTGRPO_HD acc load(storage x) { return x; }
};
template <>
struct ValueTraits<kBF16> {
  using storage = uint16_t;
  using acc = float;
  static MTGRPO_HD acc load(storage x) { return bf16_to_float(x); }
};
template <>
struct ValueTraits<kF16> {
  using storage = uint16_t;
  using acc = float;
  static MTGRPO_HD acc load(storage x) { return f16_to_float(x); }
};

template <int MK>
struct MaskTraits;
template <>
struct MaskTraits<kMaskU8> {
  using storage = uint8_t;
  static MTGRPO_HD bool set(storage x) { return x != 0; }
};
template <>
struct MaskTraits<kMaskI16> {
  using storage = uint16_t;
  static MTGRPO_HD bool set(storage x) { return x != 0; }
};
template <>
struct MaskTraits<kMaskI32> {
  using storage = uint32_t;
  static MTGRPO_HD bool set(storage x) { return x != 0; }
};
template <>
struct MaskTraits<kMaskI64> {
  using storage = uint64_t;
  static MTGRPO_HD bool set(storage x) { return x != 0; }
};
template <>
struct MaskTraits<kMaskH16> {  // float16 and bfloat16 bits
  using storage = uint16_t;
  static MTGRPO_HD bool set(storage x) { return (x & 0x7fffu) != 0; }
};
template <>
struct MaskTraits<kMaskF32> {
  using storage = uint32_t;
  static MTGRPO_HD bool set(storage x) { return (x & 0x7fffffffu) != 0; }
};
template <>
struct MaskTraits<kMaskF64> {
  using storage = uint64_t;
  static MTGRPO_HD bool set(storage x) { return (x & 0x7fffffffffffffffull) != 0; }
};

// x when on, else +0. The host version clears the bits with an integer mask (same result)
// because GCC does not if-convert the float select, and the 32-lane loop must vectorise.
MTGRPO_HD float keep_if(bool on, float x) {
#if defined(__CUDA_ARCH__)
  return on ? x : 0.0f;
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0u - uint32_t(on);
  std::memcpy(&x, &b, sizeof b);
  return x;
#endif
}

MTGRPO_HD double keep_if(bool on, double x) {
#if defined(__CUDA_ARCH__)
  return on ? x : 0.0;
#else
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0ull - uint64_t(on);
  std::memcpy(&x, &b, sizeof b);
  return x;
#endif
}

// One lane's contribution of one element: the selected value or +0 (a masked-out NaN never
// enters the sum).
template <int VT, int MK>
MTGRPO_HD typename ValueTraits<VT>::acc masked_value(typename ValueTraits<VT>::storage v,
                                                     typename MaskTraits<MK>::storage m) {
  return keep_if(MaskTraits<MK>::set(m), ValueTraits<VT>::load(v));
}

// The shuffle tree of step 2 on an array of 32 lane sums (host side); lane 0 gets the sum.
template <typename Acc>
MTGRPO_HD Acc fold_lanes(Acc* lanes) {
  for (int off = kLanes / 2; off >= 1; off >>= 1)
    for (int l = 0; l < off; ++l) lanes[l] += lanes[l + off];
  return lanes[0];
}

// Location of unit u in the [rows, cols] arrays.
MTGRPO_HD void unit_extent(const Plan& p, int64_t u, int64_t* row, int64_t* offset, int64_t* len) {
  const int64_t n = u / p.segs_per_row;
  const int64_t s = u - n * p.segs_per_row;
  const int64_t start = s * p.seg_len;
  const int64_t rest = p.cols - start;
  *row = n;
  *offset = n * p.cols + start;
  *len = rest < p.seg_len ? rest : p.seg_len;
}

// Bytes of CUDA workspace: blocks*K partial sums (Acc) then blocks*K partial counts (uint32).
inline int64_t workspace_bytes(const Plan& p, int acc_bytes) {
  return p.blocks * p.tasks * (int64_t(acc_bytes) + 4);
}

// ---- host twin of the CUDA kernels ------------------------------------------------------
// Runs the kernels' exact sequence of floating-point operations on the CPU, one "thread"
// at a time: warps reduce units lane by lane, thread 0 adds a tile's unit sums to the bins
// in unit order, blocks write partials, the combine kernel adds partials in block order.
// Scalar and slow on purpose: it is the executable description of the kernels that the CPU
// tests check against the reference (and the GPU tests check the kernels against).
// task ids outside [0, K) are skipped, as in the kernel (the callers validate them first).
template <int VT, int MK>
void task_masked_sum_twin(const typename ValueTraits<VT>::storage* values, const typename MaskTraits<MK>::storage* mask,
                          const int64_t* task_ids, int64_t rows, int64_t cols, int tasks,
                          typename ValueTraits<VT>::acc* sums, int64_t* counts) {
  using Acc = typename ValueTraits<VT>::acc;
  const Plan p = make_plan(rows, cols, tasks);
  std::vector<Acc> part_sums(size_t(p.blocks) * tasks);
  std::vector<uint32_t> part_counts(size_t(p.blocks) * tasks);
  std::vector<Acc> bins(tasks);
  std::vector<uint32_t> cbins(tasks);
  Acc tile_sum[kWarpsPerBlock];
  uint32_t tile_cnt[kWarpsPerBlock];
  for (int64_t b = 0; b < p.blocks; ++b) {  // task_masked_sum_partial_kernel, block b
    std::fill(bins.begin(), bins.end(), Acc(0));
    std::fill(cbins.begin(), cbins.end(), 0u);
    const int64_t u0 = b * p.units_per_block;
    const int64_t u1 = std::min(p.units, u0 + p.units_per_block);
    for (int64_t tile = u0; tile < u1; tile += kWarpsPerBlock) {
      for (int w = 0; w < kWarpsPerBlock; ++w) {  // warp w reduces unit tile + w
        const int64_t u = tile + w;
        Acc lanes[kLanes];
        uint32_t c = 0;
        for (int l = 0; l < kLanes; ++l) {
          Acc s = Acc(0);
          if (u < u1) {
            int64_t row, off, len;
            unit_extent(p, u, &row, &off, &len);
            for (int64_t i = l; i < len; i += kLanes) {
              s += masked_value<VT, MK>(values[off + i], mask[off + i]);
              c += MaskTraits<MK>::set(mask[off + i]) ? 1u : 0u;
            }
          }
          lanes[l] = s;
        }
        tile_sum[w] = fold_lanes(lanes);
        tile_cnt[w] = c;
      }
      const int64_t here = std::min<int64_t>(kWarpsPerBlock, u1 - tile);
      for (int64_t j = 0; j < here; ++j) {  // thread 0, in unit order
        const int64_t k = task_ids[(tile + j) / p.segs_per_row];
        if (k < 0 || k >= tasks) continue;
        bins[k] += tile_sum[j];
        cbins[k] += tile_cnt[j];
      }
    }
    for (int k = 0; k < tasks; ++k) {
      part_sums[size_t(b) * tasks + k] = bins[k];
      part_counts[size_t(b) * tasks + k] = cbins[k];
    }
  }
  for (int k = 0; k < tasks; ++k) {  // task_masked_sum_combine_kernel, thread k
    Acc s = Acc(0);
    int64_t c = 0;
    for (int64_t b = 0; b < p.blocks; ++b) {
      s += part_sums[size_t(b) * tasks + k];
      c += part_counts[size_t(b) * tasks + k];
    }
    sums[k] = s;
    counts[k] = c;
  }
}

// ---- CUDA kernels ------------------------------------------------------------------------
#if defined(__CUDACC__)

template <typename Acc>
__device__ __forceinline__ Acc warp_fold(Acc s) {
  // Same tree as fold_lanes: lane l adds lane l+off, off = 16..1; lane 0 holds the sum.
#pragma unroll
  for (int off = kLanes / 2; off >= 1; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  return s;
}

__device__ __forceinline__ uint32_t warp_count(uint32_t c) {
#pragma unroll
  for (int off = kLanes / 2; off >= 1; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
  return c;
}

// Shared memory: bins[K] (Acc), cbins[K] (uint32), then tile_sum[2][8] (Acc) and
// tile_cnt[2][8]: two tile buffers, so warps write tile i+1 while thread 0 still adds tile i
// to the bins (one __syncthreads per tile instead of two). At most 4096*12 + 16*12 = 49,344
// bytes (fp64, K = 4096), within sm_80's 163 KB and sm_90's 227 KB opt-in limits.
inline size_t partial_kernel_smem_bytes(int tasks, int acc_bytes) {
  size_t head = size_t(tasks) * (acc_bytes + 4);
  head = (head + 15) & ~size_t(15);
  return head + 2 * kWarpsPerBlock * (acc_bytes + 4);
}

// Steps 1-3 of the plan: one CUDA block per plan block, 256 threads (8 warps). Warp w
// reduces unit tile+w of every tile of 8 units (the plan makes every tile full but the
// grid's last); thread 0 then adds the 8 unit sums to the bins in unit order.
template <int VT, int MK>
__global__ void __launch_bounds__(kWarpsPerBlock* kLanes)
    task_masked_sum_partial_kernel(const typename ValueTraits<VT>::storage* __restrict__ values,
                                   const typename MaskTraits<MK>::storage* __restrict__ mask,
                                   const int64_t* __restrict__ task_ids, Plan p,
                                   typename ValueTraits<VT>::acc* __restrict__ part_sums,
                                   uint32_t* __restrict__ part_counts) {
  using Acc = typename ValueTraits<VT>::acc;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = p.tasks;
  Acc* bins = reinterpret_cast<Acc*>(smem);
  uint32_t* cbins = reinterpret_cast<uint32_t*>(bins + K);
  size_t head = size_t(K) * (sizeof(Acc) + 4);
  head = (head + 15) & ~size_t(15);
  Acc* tile_sum = reinterpret_cast<Acc*>(smem + head);                              // [2][8]
  uint32_t* tile_cnt = reinterpret_cast<uint32_t*>(tile_sum + 2 * kWarpsPerBlock);  // [2][8]

  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    bins[k] = Acc(0);
    cbins[k] = 0u;
  }
  // No barrier here: thread 0 first touches the bins after the loop's first barrier, which
  // every thread reaches after zeroing its bins; without a tile, thread i copies out the
  // bins it zeroed itself.
  const int warp = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t u0 = int64_t(blockIdx.x) * p.units_per_block;
  const int64_t u1 = p.units < u0 + p.units_per_block ? p.units : u0 + p.units_per_block;
  int buf = 0;
  for (int64_t tile = u0; tile < u1; tile += kWarpsPerBlock, buf ^= 1) {
    const int64_t u = tile + warp;
    Acc s = Acc(0);
    uint32_t c = 0;
    if (u < u1) {  // warp-uniform
      int64_t row, off, len;
      unit_extent(p, u, &row, &off, &len);
      const auto* v = values + off;
      const auto* m = mask + off;
      const int n = int(len);
      // 8 independent loads of each array in flight per lane before the dependent adds
      // (4 when both are 8-byte: fp64 values with an fp64/int64 mask spilled 4 bytes on
      // sm_90 at 8, since ptxas holds these kernels to 32 registers).
      constexpr int kUnroll = sizeof(*v) + sizeof(*m) >= 16 ? 4 : 8;
#pragma unroll kUnroll
      for (int i = lane; i < n; i += kLanes) {
        const auto mi = m[i];
        s += masked_value<VT, MK>(v[i], mi);
        c += MaskTraits<MK>::set(mi) ? 1u : 0u;
      }
    }
    s = warp_fold(s);
    c = warp_count(c);
    if (lane == 0) {
      tile_sum[buf * kWarpsPerBlock + warp] = s;
      tile_cnt[buf * kWarpsPerBlock + warp] = c;
    }
    // One barrier per tile: after it, buffer `buf` is complete. Thread 0 reads it while the
    // other warps reduce the next tile into buffer buf^1; they can write `buf` again only
    // after the next barrier, which thread 0 reaches after its adds.
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t here = u1 - tile < kWarpsPerBlock ? u1 - tile : int64_t(kWarpsPerBlock);
      for (int64_t j = 0; j < here; ++j) {
        const int64_t k = task_ids[(tile + j) / p.segs_per_row];
        if (k < 0 || k >= K) continue;  // validated by the caller; never write out of bounds
        bins[k] += tile_sum[buf * kWarpsPerBlock + j];
        cbins[k] += tile_cnt[buf * kWarpsPerBlock + j];
      }
    }
  }
  __syncthreads();  // thread 0's last adds, before every thread copies the bins out
  Acc* ps = part_sums + int64_t(blockIdx.x) * K;
  uint32_t* pc = part_counts + int64_t(blockIdx.x) * K;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    ps[k] = bins[k];
    pc[k] = cbins[k];
  }
}

// Step 4: thread k adds partial[b][k] in block order (coalesced across k).
template <typename Acc>
__global__ void task_masked_sum_combine_kernel(const Acc* __restrict__ part_sums,
                                               const uint32_t* __restrict__ part_counts, int64_t blocks, int tasks,
                                               Acc* __restrict__ sums, int64_t* __restrict__ counts) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= tasks) return;
  Acc s = Acc(0);
  int64_t c = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    s += part_sums[b * tasks + k];
    c += part_counts[b * tasks + k];
  }
  sums[k] = s;
  counts[k] = c;
}

// Backward of a per-task weighted sum: out[n,t] = mask[n,t] ? table[task_ids[n]] : 0, where
// table[K] already holds d loss / d values for task k in the output dtype (ES = its bits).
// Flat grid-stride loop; the (row, col) of each step advances without a 64-bit division.
template <typename ES, int MK>
__global__ void task_weighted_grad_kernel(ES* __restrict__ out,
                                          const typename MaskTraits<MK>::storage* __restrict__ mask,
                                          const int64_t* __restrict__ task_ids, const ES* __restrict__ table,
                                          int64_t rows, int64_t cols, int tasks) {
  const int64_t total = rows * cols;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  int64_t row = i / cols, col = i - row * cols;
  const int64_t srow = stride / cols, scol = stride - srow * cols;
  for (; i < total; i += stride) {
    const int64_t k = task_ids[row];
    const ES val = (k >= 0 && k < tasks) ? table[k] : ES(0);
    out[i] = MaskTraits<MK>::set(mask[i]) ? val : ES(0);
    row += srow;
    col += scol;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
}

#endif  // __CUDACC__

}  // namespace task_acc
}  // namespace mtgrpo
