// The per-token policy-loss forms of the fused GRPO loss: one functor per form (the C++ side
// of the registry in mtgrpo_core/ops/grpo_loss.py, POLICY_LOSSES), selected by a template
// parameter outside the token loop. Each form maps one token to its loss and the loss's
// derivatives, written once for a value type V and its mask type M:
//   scalar: V = double, M = bool (the float64 path);  vector: V = vf, M = vi (the float path).
// Textually included inside a namespace that defines sel(M, V, V), vmin(V, V), vmax(V, V)
// and vexp(V), once per namespace (scalar, and each vector ISA under its `#pragma GCC
// target`), so no include guard. Formulas and their sources: docs/ALGORITHMS.md section 1.4.
//
// Inputs of a token (FormArgs): the advantage a, the importance ratio r (after the cap), the
// log-prob x, the unclamped log-ratio d = x - old, the row constant rc (GMPO's sequence ratio,
// VESPO's gamma weight; 1 otherwise) and the sign masks of a. Outputs (FormOut): the loss l,
// d l / d r (the kernel chains it with d r / d x) and the direct d l / d x, and the clip masks
// counted by the statistics (low side, high side, dual clip).

template <typename V, typename M>
struct FormArgs {
  V a, r, x, d, rc;
  M a_neg, a_pos;
};

// Constants of a call, prepared once outside the token loop. lo / hi: the ratio clip range
// 1 - eps_low, 1 + eps_high; eps_lo / eps_hi: the raw epsilons (GMPO clips the log-ratio).
template <typename V, typename M>
struct FormConsts {
  V lo, hi, dual, eps_lo, eps_hi, tau_pos, tau_neg, zero, one, four;
  M never;  // an all-false mask
};

template <typename V, typename M>
struct FormOut {
  V l, dldr, dldx;
  M clo, chi, du;
};

template <int F>
struct PolicyForm;

// "vanilla" (verl compute_policy_loss_vanilla; TRL grpo/bnpo/dr_grpo/dapo/luspo): PPO clip
// max(-a r, -a clip(r, lo, hi)), then verl's dual clip min(., -a c) where a < 0.
template <>
struct PolicyForm<kFormVanilla> {
  template <typename V, typename M>
  static inline __attribute__((always_inline)) FormOut<V, M> eval(const FormArgs<V, M>& t, const FormConsts<V, M>& k) {
    const V neg_a = -t.a;
    const V rc = vmin(vmax(t.r, k.lo), k.hi);
    const V l1 = neg_a * t.r, l2 = neg_a * rc;
    const M use1 = l1 >= l2;
    V l = sel(use1, l1, l2);
    V dldr = sel(use1, neg_a, k.zero);
    const V l3 = neg_a * k.dual;
    const M du = t.a_neg & (l3 < l);  // (scalar: bool & bool is an int, converted back)
    l = sel(du, l3, l);
    dldr = sel(du, k.zero, dldr);
    const M clo = (t.r < k.lo) & t.a_neg, chi = (t.r > k.hi) & t.a_pos;
    return {l, dldr, k.zero, clo, chi, du};
  }
};

// "cispo" (verl compute_policy_loss_cispo; TRL cispo with eps_low -> 1): the clipped ratio as a
// stop-gradient weight of the log-prob, -sg(clip(r, lo, hi)) a x.
template <>
struct PolicyForm<kFormCispo> {
  template <typename V, typename M>
  static inline __attribute__((always_inline)) FormOut<V, M> eval(const FormArgs<V, M>& t, const FormConsts<V, M>& k) {
    const V c = vmin(vmax(t.r, k.lo), k.hi);
    const V coef = -c * t.a;
    const M clo = t.r<k.lo, chi = t.r> k.hi;
    return {coef * t.x, k.zero, coef, clo, chi, k.never};
  }
};

// "sapo" (verl compute_policy_loss_sapo, TRL sapo): the soft gate -a sigmoid(tau (r - 1)) 4 / tau,
// tau = tau_pos where a > 0, else tau_neg; d / d r = -a 4 s (1 - s).
template <>
struct PolicyForm<kFormSapo> {
  template <typename V, typename M>
  static inline __attribute__((always_inline)) FormOut<V, M> eval(const FormArgs<V, M>& t, const FormConsts<V, M>& k) {
    const V tau = sel(t.a_pos, k.tau_pos, k.tau_neg);
    const V s = k.one / (k.one + vexp(-(tau * (t.r - k.one))));
    const V gate = s * k.four / tau;
    const V neg_a = -t.a;
    return {neg_a * gate, neg_a * k.four * s * (k.one - s), k.zero, k.never, k.never, k.never};
  }
};

// "gpg" (verl compute_policy_loss_gpg) with rc = 1, and "vespo" (TRL vespo) with rc = the
// row's gamma weight phi (a stop-gradient): -rc a x.
template <>
struct PolicyForm<kFormLogpWeighted> {
  template <typename V, typename M>
  static inline __attribute__((always_inline)) FormOut<V, M> eval(const FormArgs<V, M>& t, const FormConsts<V, M>& k) {
    const V coef = -t.rc * t.a;
    return {coef * t.x, k.zero, coef, k.never, k.never, k.never};
  }
};

// "geo_mean" (verl compute_policy_loss_geo_mean, GMPO): the row's loss -a exp(mean_t dmin_t)
// with dmin_t = d_t clipped to <= eps_hi (a > 0) or >= -eps_lo (a < 0); rc = that ratio, so
// each token carries -a rc (the seq-mean-token-mean weight 1 / len makes the row's share) and
// d / d x_t = -a rc [d_t inside its clip].
template <>
struct PolicyForm<kFormGeoMean> {
  template <typename V, typename M>
  static inline __attribute__((always_inline)) FormOut<V, M> eval(const FormArgs<V, M>& t, const FormConsts<V, M>& k) {
    const V neg_a = -t.a;
    const V l = neg_a * t.rc;
    const M inside = sel(t.a_pos, sel(t.d <= k.eps_hi, k.one, k.zero), sel(t.d >= -k.eps_lo, k.one, k.zero)) > k.zero;
    const M clipped = (t.d < -k.eps_lo) | (t.d > k.eps_hi);
    const M clo = clipped & t.a_neg, chi = clipped & t.a_pos;
    return {l, k.zero, sel(inside, l, k.zero), clo, chi, k.never};
  }
};
