// Per-tile epilogues of the fused LM head + log-prob on the CPU (backend "cpu").
//
// The chunked CPU path computes each logits tile z_raw = h_t @ W_v^T (+ b_v) with torch's BLAS
// (95% of the time at M=8192, H=512, V=32000 is those GEMMs) and hands the fp32/fp64 tile to
// these functions, which do everything element-wise in ONE sweep over each row (the tile row
// of <= 32,768 floats = 128 KB stays in L2 between the max pass and the exp pass):
//
//   forward : online (max m, s = sum e^(z-m), t = sum e^(z-m) (z-m)) per row merged into the
//             running statistics of earlier vocabulary chunks, plus the target logit;
//   backward: the tile is overwritten with dL/dz_raw = scale * (gl onehot - p (gl + ge (log p + ent)))
//             (ge = 0 without entropy), ready for the dh / dW GEMMs.
//
// z = scale * z_raw with scale = 1 / temperature, applied here so the GEMM needs no extra pass.
// The torch version of the same epilogue made 4-7 passes over the tile (sub, exp, add, mul,
// add, mul, neg, index_put), each one a full trip through memory for a 128 MB tile.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mtgrpo {
namespace ll {

// exp(x) for x <= 88 (the callers pass x <= ~0), vectorisable by GCC: Cody-Waite reduction
// x = k ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (truncation r^8/8! < 6e-9 relative,
// under the 6e-8 float epsilon), 2^k built in the exponent bits. Below -87.3 the result is
// exactly 0 (e^-87.3 = 1.2e-38 is the smallest normal float): a p that underflows must
// contribute exactly 0 even when multiplied by 1/temperature = 1e30.
inline float exp_f(float x) {
  const bool under = x < -87.3f;
  float xc = x > 88.0f ? 88.0f : (under ? -87.3f : x);
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f + r * (1.0f / 40320.0f);
  p = 1.0f / 720.0f + r * p;
  p = 1.0f / 120.0f + r * p;
  p = 1.0f / 24.0f + r * p;
  p = 1.0f / 6.0f + r * p;
  p = 0.5f + r * p;
  p = 1.0f + r * p;
  p = 1.0f + r * p;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return under ? 0.0f : p * two_k;
}
inline double exp_f(double x) {
  return std::exp(x);
}

// Running statistics of one row across vocabulary chunks: m (max of z), s = sum e^(z - m),
// t = sum e^(z - m) (z - m) (entropy numerator, relative to m so that the entropy
// log s - t / s never subtracts two large numbers), tgt = z[target].
template <typename T>
struct RowStats {
  T* m;
  T* s;
  T* t;  // null without entropy
  T* tgt;
};

// Lanes of the independent partial sums: GCC vectorises the inner lane loop (SLP) without
// -ffast-math, which a single scalar accumulator would forbid (no reassociation).
constexpr int kLanes = 16;

template <typename T>
inline void fwd_row(const T* z, int64_t n, int64_t local, T scale, bool with_entropy, int64_t i,
                    const RowStats<T>& st) {
  // pass 1: chunk max (max is exact in any order)
  T mx_l[kLanes];
  for (int l = 0; l < kLanes; ++l) mx_l[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) mx_l[l] = z[j + l] > mx_l[l] ? z[j + l] : mx_l[l];
  T mx = -std::numeric_limits<T>::infinity();
  for (int l = 0; l < kLanes; ++l) mx = mx_l[l] > mx ? mx_l[l] : mx;
  for (; j < n; ++j) mx = z[j] > mx ? z[j] : mx;
  const T mc = mx * scale;  // scale > 0: the max of the scaled logits
  // pass 2: s_c = sum e^(z - mc), t_c = sum e^(z - mc) (z - mc)
  T s_l[kLanes] = {}, t_l[kLanes] = {};
  j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T d = z[j + l] * scale - mc;
      const T e = exp_f(d);
      s_l[l] += e;
      t_l[l] += e * d;  // e = 0 where d underflows: no 0 * inf (d is finite)
    }
  T sc = 0, tc = 0;
  for (int l = 0; l < kLanes; ++l) {
    sc += s_l[l];
    tc += t_l[l];
  }
  for (; j < n; ++j) {
    const T d = z[j] * scale - mc;
    const T e = exp_f(d);
    sc += e;
    tc += e * d;
  }
  if (local >= 0) st.tgt[i] = z[local] * scale;
  // merge with the earlier chunks: rescale both parts to the new max
  const T m_old = st.m[i], s_old = st.s[i];
  const T m_new = m_old > mc ? m_old : mc;
  const T a = s_old > 0 ? exp_f(m_old - m_new) : T(0);  // m_old = -inf on the first chunk
  const T b = exp_f(mc - m_new);
  if (with_entropy) {
    // sum e_old (z - m_new) = a (t_old + (m_old - m_new) s_old); same for the new part
    const T t_old = st.t[i];
    const T part_old = s_old > 0 ? a * (t_old + (m_old - m_new) * s_old) : T(0);
    st.t[i] = part_old + b * (tc + (mc - m_new) * sc);
  }
  st.s[i] = a * s_old + b * sc;
  st.m[i] = m_new;
}

template <typename T>
struct BwdRow {
  T lse, ent, gl, ge;  // ge = 0 without entropy
};

// Overwrites row z[0:n] with dL/dz_raw. local = column of the target in this chunk or -1.
template <typename T>
inline void bwd_row(T* z, int64_t n, int64_t local, T scale, bool with_entropy, const BwdRow<T>& r) {
  const T gls = r.gl * scale, ges = r.ge * scale;
  if (with_entropy) {
    for (int64_t j = 0; j < n; ++j) {
      const T lp = z[j] * scale - r.lse;
      const T p = exp_f(lp);
      // p == 0 (underflow) contributes exactly 0, also when log p + ent is huge (tiny tau)
      z[j] = p > 0 ? -p * (gls + ges * (lp + r.ent)) : T(0);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T p = exp_f(z[j] * scale - r.lse);
      z[j] = -p * gls;
    }
  }
  if (local >= 0) z[local] += gls;
}

}  // namespace ll
}  // namespace mtgrpo
