// Ratio-preserving sampler core (see csrc/include/mtgrpo/sampler.h for the contract).
// Plain C++17; the pure-Python oracle mtgrpo_core/reference/sampler.py mirrors every
// random call made here in the same order.
#include "mtgrpo/sampler.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

namespace mtgrpo {
namespace sampler {

namespace {

template <typename... Args>
[[noreturn]] void bad(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

template <typename... Args>
[[noreturn]] void misuse(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}

// A product rounded to double and stored, so it cannot be fused into an FMA with a
// following add/sub (see header): keeps results equal to Python's on every target.
inline double no_contract_mul(double a, double b) {
  volatile double r = a * b;
  return r;
}

constexpr int64_t kMaxPool = 4294967295LL;  // prompts are uint32 in the lazy permutation

}  // namespace

Rounding parse_rounding(const std::string& name) {
  if (name == "largest-remainder") return Rounding::LargestRemainder;
  if (name == "multinomial") return Rounding::Multinomial;
  bad("rounding: expected 'largest-remainder' or 'multinomial', got '", name, "'");
}

const char* rounding_name(Rounding r) {
  return r == Rounding::Multinomial ? "multinomial" : "largest-remainder";
}

Refill parse_refill(const std::string& name) {
  if (name == "fill-then-deficit") return Refill::FillThenDeficit;
  if (name == "deficit") return Refill::Deficit;
  bad("refill: expected 'fill-then-deficit' or 'deficit', got '", name, "'");
}

const char* refill_name(Refill r) {
  return r == Refill::Deficit ? "deficit" : "fill-then-deficit";
}

Inflation parse_inflation(const std::string& name) {
  if (name == "per-step") return Inflation::PerStep;
  if (name == "per-round") return Inflation::PerRound;
  bad("inflation: expected 'per-step' or 'per-round', got '", name, "'");
}

const char* inflation_name(Inflation r) {
  return r == Inflation::PerRound ? "per-round" : "per-step";
}

void check_weights(const double* w, int64_t n, int64_t K, const char* name) {
  if (n != K) bad(name, ": expected ", K, " entries (one per task), got ", n);
  double s = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(w[k])) bad(name, "[", k, "] = ", w[k], " is not finite");
    if (w[k] < 0.0) bad(name, "[", k, "] = ", w[k], " is negative");
    s += w[k];
  }
  if (s == 0.0) bad(name, ": all weights are zero; they must sum to 1");
  if (std::fabs(s - 1.0) > 1e-6) bad(name, ": must sum to 1 within 1e-6, got sum ", s);
}

void apportion(const double* w, int64_t K, int64_t total, Rounding method, Pcg32& rng, int64_t* out) {
  double S = 0.0;
  for (int64_t k = 0; k < K; ++k) S += w[k];
  for (int64_t k = 0; k < K; ++k) out[k] = 0;
  if (total <= 0) return;
  if (!(S > 0.0)) throw std::logic_error("apportion: weights sum to zero");
  // Callers validate these bounds and raise ValueError; this is the last line of defence
  // against an hours-long multinomial loop or an inexact float(total).
  if (total > kMaxTotal) throw std::invalid_argument("batch_size: at most 2**53 can be apportioned exactly");
  if (method == Rounding::Multinomial && total > kMaxMultinomialDraws)
    throw std::invalid_argument("batch_size: multinomial rounding draws one number per prompt; at most 2**22 prompts");
  if (method == Rounding::LargestRemainder) {
    std::vector<double> rem(static_cast<size_t>(K), 0.0);
    std::vector<int64_t> order;
    int64_t assigned = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (!(w[k] > 0.0)) continue;
      double x = no_contract_mul(w[k] / S, static_cast<double>(total));
      double f = std::floor(x);
      out[k] = static_cast<int64_t>(f);
      rem[k] = x - f;
      assigned += out[k];
      order.push_back(k);
    }
    int64_t left = total - assigned;
    if (order.empty()) throw std::logic_error("apportion: no positive weight");
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return rem[a] != rem[b] ? rem[a] > rem[b] : a < b; });
    for (int64_t i = 0; left > 0; ++i, --left) out[order[static_cast<size_t>(i) % order.size()]] += 1;
    // Overshoot: the normalised weights can sum to 1 + K ulp, so for totals near 2^53 the
    // floors can add up to more than `total` (2^62 did before totals were bounded). Take
    // the excess back from the smallest remainders (walking `order` backwards), skipping
    // zeros; the Python twin does the same.
    for (int64_t i = 0; left < 0; ++i) {
      int64_t k = order[order.size() - 1 - static_cast<size_t>(i) % order.size()];
      if (out[k] > 0) {
        out[k] -= 1;
        ++left;
      }
    }
    return;
  }
  // Multinomial(total, z): inverse CDF per draw; cum is non-decreasing so the first index
  // with cum > u is never a zero-weight task.
  std::vector<double> cum(static_cast<size_t>(K));
  double c = 0.0;
  int64_t last = -1;
  for (int64_t k = 0; k < K; ++k) {
    c += w[k] / S;
    cum[k] = c;
    if (w[k] > 0.0) last = k;
  }
  for (int64_t i = 0; i < total; ++i) {
    double u = rng.next_double();
    int64_t k = std::upper_bound(cum.begin(), cum.end(), u) - cum.begin();
    if (k >= K) k = last;  // u above a sum that rounded below 1
    out[k] += 1;
  }
}

// ---------------------------------------------------------------------------- U64Map
void U64Map::reset(size_t cap) {
  slots_.assign(cap, Slot{kEmpty, 0});
  size_ = 0;
  unsigned bits = 0;
  while ((size_t(1) << bits) < cap) ++bits;
  shift_ = 64u - bits;
}

void U64Map::clear() {
  if (size_ == 0) return;  // already empty: keep the capacity for the next step
  if (slots_.size() > 4096 && size_ * 8 < slots_.size()) {
    reset(16);  // shrink a table left large by an unusually big step
    return;
  }
  std::fill(slots_.begin(), slots_.end(), Slot{kEmpty, 0});
  size_ = 0;
}

const int64_t* U64Map::find(uint64_t key) const {
  size_t mask = slots_.size() - 1;
  for (size_t i = slot(key);; i = (i + 1) & mask) {
    if (slots_[i].key == key) return &slots_[i].val;
    if (slots_[i].key == kEmpty) return nullptr;
  }
}

int64_t* U64Map::find(uint64_t key) {
  return const_cast<int64_t*>(static_cast<const U64Map*>(this)->find(key));
}

void U64Map::put(uint64_t key, int64_t val) {
  if ((size_ + 1) * 2 > slots_.size()) grow();
  size_t mask = slots_.size() - 1;
  for (size_t i = slot(key);; i = (i + 1) & mask) {
    if (slots_[i].key == key) {
      slots_[i].val = val;
      return;
    }
    if (slots_[i].key == kEmpty) {
      slots_[i] = Slot{key, val};
      ++size_;
      return;
    }
  }
}

void U64Map::grow() {
  std::vector<Slot> old = std::move(slots_);
  reset(old.size() * 2);
  for (const Slot& sl : old)
    if (sl.key != kEmpty) put(sl.key, sl.val);
}

// ---------------------------------------------------------------------------- LazyPermutation
namespace {
inline uint32_t mix32(uint32_t v) {
  v *= 0x9E3779B1u;
  v ^= v >> 15;
  v *= 0x85EBCA77u;
  v ^= v >> 13;
  return v;
}
}  // namespace

LazyPermutation::LazyPermutation(uint32_t n) : n_(n), limit_(n) {
  unsigned b = 0;
  while (b < 32 && (uint64_t(1) << b) < n) ++b;
  h_ = std::max(1u, (b + 1) / 2);
  mask_ = static_cast<uint32_t>((uint64_t(1) << h_) - 1);
}

void LazyPermutation::set_keys(Pcg32& rng) {
  for (uint32_t& k : keys_) k = rng.next_u32();
}

uint32_t LazyPermutation::feistel(uint32_t x) const {
  uint32_t L = x >> h_, R = x & mask_;
  for (int r = 0; r < 4; ++r) {
    uint32_t t = L ^ (mix32(R ^ keys_[r]) & mask_);
    L = R;
    R = t;
  }
  return (L << h_) | R;
}

uint32_t LazyPermutation::pi(uint32_t i) const {
  uint32_t y = feistel(i);
  while (y >= n_) y = feistel(y);  // ends: the cycle through i < n returns below n
  return y;
}

uint32_t LazyPermutation::draw() {
  if (pos_ >= limit_) throw std::logic_error("LazyPermutation::draw: no prompt left in this step (inconsistent state)");
  const uint32_t d = static_cast<uint32_t>(parked_.size());
  if (pos_ < n_ - d) {
    for (;;) {
      if (cursor_ >= n_) throw std::logic_error("LazyPermutation::draw: epoch overrun (inconsistent state)");
      uint32_t x = pi(cursor_++);
      if (d == 0 || parked_set_.find(x) == nullptr) {
        ++pos_;
        return x;
      }
    }
  }
  return parked_[pos_++ - (n_ - d)];
}

void LazyPermutation::new_epoch(Pcg32& rng, const uint32_t* parked, size_t d) {
  ++epoch_;
  pos_ = 0;
  cursor_ = 0;
  set_keys(rng);
  parked_.assign(parked, parked + d);
  parked_set_.clear();
  for (uint32_t x : parked_) parked_set_.put(x, 1);
  limit_ = n_ - static_cast<uint32_t>(d);
}

void LazyPermutation::restore(int64_t epoch, uint32_t pos, uint32_t limit, uint32_t cursor, const uint32_t* keys,
                              const std::vector<uint32_t>& parked) {
  const size_t d = parked.size();
  if (d > n_ || pos > limit || limit > n_ || cursor > n_)
    bad("state_dict['perm_pos'/'perm_limit'/'perm_cursor']: inconsistent pool position");
  if (limit < n_ && limit != n_ - d) bad("state_dict['perm_limit']: inconsistent with the parked prompts");
  U64Map set;
  for (uint32_t x : parked) {
    if (x >= n_ || set.find(x) != nullptr)
      bad("state_dict['park_prompt']: parked prompts must be distinct pool indices");
    set.put(x, 1);
  }
  // Drawn from pi so far = cursor; of those, parked ones were skipped: pos can't exceed it.
  if (pos < n_ - d && pos > cursor) bad("state_dict['perm_cursor']: behind perm_pos");
  epoch_ = epoch;
  pos_ = pos;
  limit_ = limit;
  cursor_ = cursor;
  for (int r = 0; r < 4; ++r) keys_[r] = keys[r];
  parked_ = parked;
  parked_set_ = std::move(set);
}

// ---------------------------------------------------------------------------- config
void SamplerConfig::validate() const {
  if (pool_sizes.empty()) bad("pool_sizes: need at least one task, got 0");
  if (pool_sizes.size() > 1000000) bad("pool_sizes: at most 1000000 tasks, got ", pool_sizes.size());
  for (size_t k = 0; k < pool_sizes.size(); ++k)
    if (pool_sizes[k] < 0 || pool_sizes[k] > kMaxPool)
      bad("pool_sizes[", k, "] = ", pool_sizes[k], " is outside [0, 2**32 - 1]");
  if (batch_size <= 0) bad("batch_size: must be positive, got ", batch_size);
  if (batch_size > kMaxTotal) bad("batch_size: at most 2**53, got ", batch_size);
  if (!std::isfinite(oversample) || !(oversample > 0.0))
    bad("oversample: must be a finite number > 0, got ", oversample);
  if (max_rounds < 1) bad("max_rounds: must be >= 1, got ", max_rounds);
  if (warmup_steps < 0) bad("warmup_steps: must be >= 0, got ", warmup_steps);
  if (!std::isfinite(acceptance_cap) || !(acceptance_cap >= 1.0))
    bad("acceptance_cap: must be a finite number >= 1, got ", acceptance_cap);
  if (!std::isfinite(rho_decay) || rho_decay < 0.0 || rho_decay >= 1.0)
    bad("rho_decay: must lie in [0, 1), got ", rho_decay);
  double r = std::floor(no_contract_mul(oversample, static_cast<double>(batch_size)) + 0.5);
  if (!(r <= 2147483647.0))
    bad("oversample: oversample * batch_size = ", r, " prompts a round is too many (max 2**31 - 1)");
  if (std::max(r, 1.0) * static_cast<double>(max_rounds) > 4294967295.0)
    bad("max_rounds: oversample * batch_size * max_rounds must stay below 2**32 prompts a step");
  if (rounding == Rounding::Multinomial) {
    // One PCG32 double per prompt: 2^22 draws take ~40 ms here (C++) and ~5 s in the
    // Python twin; 2^31 took hours there, so larger sizes are refused, not drawn.
    if (batch_size > kMaxMultinomialDraws)
      bad("batch_size: rounding='multinomial' allows at most 2**22 = ", kMaxMultinomialDraws, ", got ", batch_size,
          " (use rounding='largest-remainder', O(K) for any size)");
    if (r > static_cast<double>(kMaxMultinomialDraws))
      bad("oversample: rounding='multinomial' allows at most 2**22 = ", kMaxMultinomialDraws,
          " prompts a round, oversample * batch_size = ", r);
  }
}

int64_t SamplerConfig::round_size() const {
  double r = std::floor(no_contract_mul(oversample, static_cast<double>(batch_size)) + 0.5);
  return std::max<int64_t>(1, static_cast<int64_t>(r));
}

// ---------------------------------------------------------------------------- sampler
RatioPreservingSampler::RatioPreservingSampler(const SamplerConfig& cfg, uint64_t seed) : cfg_(cfg), rng_(seed) {
  cfg_.validate();
  R_ = cfg_.round_size();
  size_t K = cfg_.pool_sizes.size();
  rho_.assign(K, 0.0);
  perms_.reserve(K);
  for (size_t k = 0; k < K; ++k) {
    perms_.emplace_back(static_cast<uint32_t>(cfg_.pool_sizes[k]));
    perms_.back().set_keys(rng_);  // epoch 0 keys, task by task
  }
  drawn_.assign(K, 0);
  acc_.assign(K, {});
}

void RatioPreservingSampler::require_active(const char* what) const {
  if (!active_) misuse(what, ": no step in progress; call start_step(weights) first");
}

void RatioPreservingSampler::start_step(const double* weights, int64_t n) {
  if (active_) misuse("start_step: the previous step is not finished; call finish() first");
  const int64_t K = num_tasks();
  check_weights(weights, n, K, "weights");
  for (int64_t k = 0; k < K; ++k)
    if (weights[k] > 0.0 && cfg_.pool_sizes[k] == 0)
      bad("pool_sizes[", k, "] is 0 but weights[", k, "] = ", weights[k], " > 0: a task with weight needs prompts");
  z_.assign(weights, weights + K);
  n_.assign(K, 0);
  apportion(z_.data(), K, cfg_.batch_size, cfg_.rounding, rng_, n_.data());
  compute_inflation();
  rounds_ = 0;
  round_open_ = false;
  round_start_ = 0;
  clear_step_records();
  active_ = true;
}

void RatioPreservingSampler::compute_inflation() {
  const int64_t K = num_tasks();
  m_.assign(K, 1.0);
  if (!cfg_.acceptance_aware) return;
  for (int64_t k = 0; k < K; ++k) {
    double r = std::min(rho_[k], 0.99);  // 1 - rho >= 0.01
    m_[k] = std::min(1.0 / (1.0 - r), cfg_.acceptance_cap);
  }
}

void RatioPreservingSampler::clear_step_records() {
  rec_task_.clear();
  rec_round_.clear();
  rec_prompt_.clear();
  rec_status_.clear();
  rec_index_.clear();
  indexed_ = 0;
  guess_ = 0;
  std::fill(drawn_.begin(), drawn_.end(), 0);
  for (auto& a : acc_) a.clear();
}

void RatioPreservingSampler::close_round() {
  if (!round_open_) return;
  round_open_ = false;
  const int64_t K = num_tasks();
  std::vector<int64_t> reported(K, 0), rejected(K, 0);
  for (size_t i = static_cast<size_t>(round_start_); i < rec_task_.size(); ++i) {
    int8_t s = rec_status_[i];
    if (s == kAccepted || s == kRejected) {
      reported[rec_task_[i]] += 1;
      if (s == kRejected) rejected[rec_task_[i]] += 1;
    }
  }
  const double d = cfg_.rho_decay;
  for (int64_t k = 0; k < K; ++k) {
    if (reported[k] == 0) continue;  // not drawn this round, or nothing reported for it
    double frac = static_cast<double>(rejected[k]) / static_cast<double>(reported[k]);
    double a = no_contract_mul(d, rho_[k]);
    double b = no_contract_mul(1.0 - d, frac);
    rho_[k] = a + b;
  }
}

bool RatioPreservingSampler::next_round(std::vector<int32_t>& task_ids, std::vector<int64_t>& prompt_indices) {
  require_active("next_round");
  close_round();
  if (rounds_ >= cfg_.max_rounds) return false;
  const int64_t K = num_tasks();
  std::vector<double> q(K, 0.0);
  std::vector<int64_t> cap(K, 0);
  // per-round inflation: rho already holds the rounds closed so far (close_round above)
  if (cfg_.inflation == Inflation::PerRound) compute_inflation();
  bool from_z = rounds_ == 0;
  if (!from_z) {
    int64_t total_def = 0, total_acc = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = static_cast<int64_t>(acc_[k].size());
      int64_t def = std::max<int64_t>(n_[k] - c, 0);
      total_def += def;
      total_acc += c;
      q[k] = no_contract_mul(static_cast<double>(def), m_[k]);
    }
    if (in_warmup()) {
      // ratios not enforced: only the batch size counts
      if (total_acc >= cfg_.batch_size) return false;
      from_z = true;
    } else {
      if (total_def == 0) return false;
      // fill-then-deficit: keep the z*m mix until B prompts are accepted in total
      from_z = cfg_.refill == Refill::FillThenDeficit && total_acc < cfg_.batch_size;
    }
  }
  if (from_z)
    for (int64_t k = 0; k < K; ++k) q[k] = no_contract_mul(z_[k], m_[k]);
  bool any = false;
  for (int64_t k = 0; k < K; ++k) {
    cap[k] = cfg_.pool_sizes[k] - drawn_[k];
    if (cap[k] <= 0) q[k] = 0.0;
    any = any || q[k] > 0.0;
  }
  if (!any) return false;
  // Water-filling: a task asked for more than it has left this step gives everything it
  // has and leaves the rest of the round to the others, in proportion to q.
  std::vector<int64_t> alloc(K, 0), part(K, 0);
  int64_t left = R_;
  while (left > 0) {
    bool active_left = false;
    for (int64_t k = 0; k < K; ++k) active_left = active_left || q[k] > 0.0;
    if (!active_left) break;
    apportion(q.data(), K, left, cfg_.rounding, rng_, part.data());
    bool over = false;
    for (int64_t k = 0; k < K; ++k) {
      if (q[k] > 0.0 && part[k] > cap[k]) {
        over = true;
        alloc[k] = cap[k];
        left -= cap[k];
        q[k] = 0.0;
      }
    }
    if (!over) {
      for (int64_t k = 0; k < K; ++k)
        if (q[k] > 0.0) alloc[k] = part[k];
      break;
    }
  }
  round_start_ = static_cast<int64_t>(rec_task_.size());
  const int32_t r = static_cast<int32_t>(rounds_);
  size_t base = task_ids.size();
  for (int64_t k = 0; k < K; ++k) {
    LazyPermutation& P = perms_[k];
    for (int64_t a = 0; a < alloc[k]; ++a) {
      if (P.pos() == P.n()) {
        // Epoch exhausted mid-step: park this step's earlier draws of task k at its end.
        std::vector<uint32_t> parked;
        for (size_t i = 0; i < rec_task_.size(); ++i)
          if (rec_task_[i] == k) parked.push_back(rec_prompt_[i]);
        P.new_epoch(rng_, parked.data(), parked.size());
      }
      rec_prompt_.push_back(P.draw());
      rec_task_.push_back(static_cast<int32_t>(k));
    }
    drawn_[k] += alloc[k];
  }
  const size_t end = rec_task_.size();
  rec_round_.resize(end, r);
  rec_status_.resize(end, kUnreported);
  guess_ = static_cast<size_t>(round_start_);
  size_t added = rec_task_.size() - static_cast<size_t>(round_start_);
  task_ids.resize(base + added);
  prompt_indices.resize(base + added);
  for (size_t i = 0; i < added; ++i) {
    task_ids[base + i] = rec_task_[round_start_ + i];
    prompt_indices[base + i] = rec_prompt_[round_start_ + i];
  }
  ++rounds_;
  round_open_ = true;
  return true;
}

void RatioPreservingSampler::ensure_index() {
  const size_t end = rec_task_.size();
  if (indexed_ == end) return;
  rec_index_.reserve(end);
  constexpr size_t kAhead = 8;  // prefetch distance: overlaps the table's cache misses
  for (size_t i = indexed_; i < end; ++i) {
    if (i + kAhead < end) rec_index_.prefetch(key(rec_task_[i + kAhead], rec_prompt_[i + kAhead]));
    rec_index_.put(key(rec_task_[i], rec_prompt_[i]), static_cast<int64_t>(i));
  }
  indexed_ = end;
}

int64_t RatioPreservingSampler::lookup(int64_t task, int64_t prompt, size_t guess) {
  if (guess < rec_task_.size() && rec_task_[guess] == task && rec_prompt_[guess] == prompt)
    return static_cast<int64_t>(guess);
  ensure_index();
  const int64_t* v = rec_index_.find(key(task, prompt));
  return v ? *v : -1;
}

void RatioPreservingSampler::report(const int64_t* task_ids, const int64_t* prompt_indices, const uint8_t* accepted,
                                    int64_t n) {
  require_active("report");
  const int64_t K = num_tasks();
  std::vector<int64_t> idx(static_cast<size_t>(n));
  // Pass 1: validate everything, marking entries pending; undo the marks on error so a
  // rejected report leaves the sampler exactly as it was.
  auto undo = [&](int64_t upto) {
    for (int64_t i = 0; i < upto; ++i) rec_status_[idx[i]] = kUnreported;
  };
  size_t guess = guess_;
  for (int64_t i = 0; i < n; ++i) {
    int64_t t = task_ids[i], p = prompt_indices[i];
    if (t < 0 || t >= K) {
      undo(i);
      bad("task_ids[", i, "] = ", t, " is outside [0, ", K, ")");
    }
    if (accepted[i] > 1) {
      undo(i);
      bad("accepted[", i, "] = ", int(accepted[i]), " is not a boolean");
    }
    const int64_t v = (p >= 0 && p < cfg_.pool_sizes[t]) ? lookup(t, p, guess) : -1;
    if (v < 0) {
      undo(i);
      bad("prompt_indices[", i, "] = ", p, " (task ", t, ") was not drawn in this step");
    }
    int8_t s = rec_status_[v];
    if (s != kUnreported) {
      undo(i);
      bad("prompt_indices[", i, "] = ", p, " (task ", t, ") was already reported ",
          s == kPending ? "earlier in this call" : "in this step");
    }
    rec_status_[v] = kPending;
    idx[i] = v;
    guess = static_cast<size_t>(v) + 1;
  }
  guess_ = guess;
  for (int64_t i = 0; i < n; ++i) {
    rec_status_[idx[i]] = accepted[i] ? kAccepted : kRejected;
    if (accepted[i]) acc_[task_ids[i]].push_back(static_cast<uint32_t>(prompt_indices[i]));
  }
}

Batch RatioPreservingSampler::finish() {
  require_active("finish");
  close_round();
  const int64_t K = num_tasks();
  Batch b;
  b.targets = n_;
  b.realized.assign(K, 0);
  b.rounds = rounds_;
  b.num_drawn = static_cast<int64_t>(rec_task_.size());
  std::vector<int64_t> quota(K, 0);
  // Per task: min(c_k, n_k) accepted prompts, uniformly (partial Fisher-Yates over the
  // accepted list in report order).
  int64_t chosen = 0;
  for (int64_t k = 0; k < K; ++k) {
    std::vector<uint32_t>& a = acc_[k];
    const int64_t c = static_cast<int64_t>(a.size());
    b.num_accepted += c;
    // warm-up: no per-task quota, the whole batch is the uniform top-up below
    const int64_t s = in_warmup() ? 0 : std::min(c, n_[k]);
    for (int64_t i = 0; i < s; ++i) {
      int64_t j = i + rng_.bounded(static_cast<uint32_t>(c - i));
      std::swap(a[i], a[j]);
    }
    quota[k] = s;
    chosen += s;
  }
  // Top up from the accepted prompts left over, all tasks pooled, uniformly.
  std::vector<std::pair<int32_t, uint32_t>> rest;
  for (int64_t k = 0; k < K; ++k)
    for (size_t i = static_cast<size_t>(quota[k]); i < acc_[k].size(); ++i)
      rest.emplace_back(static_cast<int32_t>(k), acc_[k][i]);
  const int64_t L = static_cast<int64_t>(rest.size());
  const int64_t t = std::max<int64_t>(0, std::min(cfg_.batch_size - chosen, L));
  for (int64_t i = 0; i < t; ++i) {
    int64_t j = i + rng_.bounded(static_cast<uint32_t>(L - i));
    std::swap(rest[i], rest[j]);
  }
  for (int64_t k = 0; k < K; ++k) b.realized[k] = quota[k];
  for (int64_t i = 0; i < t; ++i) b.realized[rest[i].first] += 1;
  // Output grouped by task: the quota picks, then that task's top-ups in pick order.
  const int64_t total = chosen + t;
  b.task_ids.resize(total);
  b.prompt_indices.resize(total);
  std::vector<int64_t> off(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) off[k + 1] = off[k] + b.realized[k];
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < quota[k]; ++i) {
      b.task_ids[off[k]] = static_cast<int32_t>(k);
      b.prompt_indices[off[k]++] = acc_[k][i];
    }
  }
  for (int64_t i = 0; i < t; ++i) {
    int32_t k = rest[i].first;
    b.task_ids[off[k]] = k;
    b.prompt_indices[off[k]++] = rest[i].second;
  }
  b.shortfall = cfg_.batch_size - total;
  // End the step.
  for (auto& P : perms_) P.end_step();
  active_ = false;
  round_open_ = false;
  clear_step_records();
  ++steps_done_;
  return b;
}

SamplerState RatioPreservingSampler::state() const {
  SamplerState s;
  s.config = cfg_;
  s.rng_state = rng_.state;
  s.rng_inc = rng_.inc;
  s.rho = rho_;
  s.steps_done = steps_done_;
  const int64_t K = num_tasks();
  for (int64_t k = 0; k < K; ++k) {
    const LazyPermutation& P = perms_[k];
    s.perm_epoch.push_back(P.epoch());
    s.perm_pos.push_back(P.pos());
    s.perm_limit.push_back(P.limit());
    s.perm_cursor.push_back(P.cursor());
    for (int r = 0; r < 4; ++r) s.perm_keys.push_back(P.keys()[r]);
    for (uint32_t x : P.parked()) {
      s.park_task.push_back(k);
      s.park_prompt.push_back(x);
    }
  }
  s.step_active = active_;
  if (active_) {
    s.step_weights = z_;
    s.step_inflation = m_;
    s.step_targets = n_;
    s.step_rounds = rounds_;
    s.round_open = round_open_;
    s.round_start = round_start_;
    s.rec_task = rec_task_;
    s.rec_round = rec_round_;
    s.rec_prompt.assign(rec_prompt_.begin(), rec_prompt_.end());
    s.rec_status = rec_status_;
    for (int64_t k = 0; k < K; ++k)
      for (uint32_t p : acc_[k]) {
        s.acc_task.push_back(static_cast<int32_t>(k));
        s.acc_prompt.push_back(p);
      }
  }
  return s;
}

void RatioPreservingSampler::load_state(const SamplerState& s) {
  // Build a fresh sampler from s, checking every index before it is used, then swap it in.
  const SamplerConfig& c = s.config;
  if (c.pool_sizes != cfg_.pool_sizes) bad("state_dict['pool_sizes']: does not match this sampler's pool_sizes");
  RatioPreservingSampler x(c, 0);
  const int64_t K = x.num_tasks();
  auto need = [&](size_t got, size_t want, const char* name) {
    if (got != want) bad("state_dict['", name, "']: expected length ", want, ", got ", got);
  };
  x.rng_.state = s.rng_state;
  x.rng_.inc = s.rng_inc | 1u;
  if ((s.rng_inc & 1u) == 0) bad("state_dict['rng_inc']: must be odd");
  need(s.rho.size(), K, "rho");
  for (int64_t k = 0; k < K; ++k)
    if (!std::isfinite(s.rho[k]) || s.rho[k] < 0.0 || s.rho[k] > 1.0)
      bad("state_dict['rho'][", k, "] is outside [0, 1]");
  x.rho_ = s.rho;
  if (s.steps_done < 0) bad("state_dict['steps_done']: must be >= 0");
  x.steps_done_ = s.steps_done;
  need(s.perm_epoch.size(), K, "perm_epoch");
  need(s.perm_pos.size(), K, "perm_pos");
  need(s.perm_limit.size(), K, "perm_limit");
  need(s.perm_cursor.size(), K, "perm_cursor");
  need(s.perm_keys.size(), 4 * K, "perm_keys");
  need(s.park_prompt.size(), s.park_task.size(), "park_prompt");
  std::vector<std::vector<uint32_t>> parked(K);
  for (size_t i = 0; i < s.park_task.size(); ++i) {
    int64_t k = s.park_task[i];
    if (k < 0 || k >= K) bad("state_dict['park_task'][", i, "] is outside [0, ", K, ")");
    if (s.park_prompt[i] < 0 || s.park_prompt[i] >= c.pool_sizes[k])
      bad("state_dict['park_prompt'][", i, "] is out of range");
    parked[k].push_back(static_cast<uint32_t>(s.park_prompt[i]));
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t N = c.pool_sizes[k];
    if (s.perm_pos[k] < 0 || s.perm_limit[k] < s.perm_pos[k] || s.perm_limit[k] > N || s.perm_cursor[k] < 0 ||
        s.perm_cursor[k] > N)
      bad("state_dict['perm_pos'/'perm_limit'/'perm_cursor'][", k,
          "]: need 0 <= pos <= limit <= pool size, 0 <= cursor <= pool size");
    if (s.perm_epoch[k] < 0) bad("state_dict['perm_epoch'][", k, "]: must be >= 0");
    uint32_t keys[4];
    for (int r = 0; r < 4; ++r) {
      int64_t v = s.perm_keys[4 * k + r];
      if (v < 0 || v > 4294967295LL) bad("state_dict['perm_keys'][", k, "]: keys are uint32");
      keys[r] = static_cast<uint32_t>(v);
    }
    x.perms_[k].restore(s.perm_epoch[k], static_cast<uint32_t>(s.perm_pos[k]), static_cast<uint32_t>(s.perm_limit[k]),
                        static_cast<uint32_t>(s.perm_cursor[k]), keys, parked[k]);
  }
  x.active_ = s.step_active;
  if (s.step_active) {
    need(s.step_weights.size(), K, "step_weights");
    need(s.step_inflation.size(), K, "step_inflation");
    need(s.step_targets.size(), K, "step_targets");
    for (int64_t k = 0; k < K; ++k) {
      if (!std::isfinite(s.step_weights[k]) || s.step_weights[k] < 0.0)
        bad("state_dict['step_weights'][", k, "] is invalid");
      if (!std::isfinite(s.step_inflation[k]) || s.step_inflation[k] < 1.0)
        bad("state_dict['step_inflation'][", k, "] is invalid");
      if (s.step_targets[k] < 0) bad("state_dict['step_targets'][", k, "] is negative");
    }
    int64_t total = 0;
    for (int64_t k = 0; k < K; ++k) total += s.step_targets[k];
    if (total != c.batch_size)
      bad("state_dict['step_targets']: must sum to batch_size = ", c.batch_size, ", got ", total);
    x.z_ = s.step_weights;
    x.m_ = s.step_inflation;
    x.n_ = s.step_targets;
    if (s.step_rounds < 0 || s.step_rounds > c.max_rounds) bad("state_dict['step_rounds'] is out of range");
    x.rounds_ = s.step_rounds;
    x.round_open_ = s.round_open;
    const size_t R = s.rec_task.size();
    need(s.rec_prompt.size(), R, "rec_prompt");
    need(s.rec_round.size(), R, "rec_round");
    need(s.rec_status.size(), R, "rec_status");
    if (s.round_start < 0 || static_cast<size_t>(s.round_start) > R) bad("state_dict['round_start'] is out of range");
    x.round_start_ = s.round_start;
    for (size_t i = 0; i < R; ++i) {
      int64_t k = s.rec_task[i], p = s.rec_prompt[i];
      if (k < 0 || k >= K || p < 0 || p >= c.pool_sizes[k])
        bad("state_dict['rec_task'/'rec_prompt'][", i, "] is out of range");
      if (s.rec_status[i] < 0 || s.rec_status[i] > 2) bad("state_dict['rec_status'][", i, "] must be 0, 1 or 2");
      if (s.rec_round[i] < 0 || s.rec_round[i] >= std::max<int64_t>(s.step_rounds, 1))
        bad("state_dict['rec_round'][", i, "] is out of range");
      if (x.rec_index_.find(key(k, p)) != nullptr)
        bad("state_dict['rec_prompt'][", i, "]: prompt drawn twice in one step");
      x.rec_index_.put(key(k, p), static_cast<int64_t>(i));
      x.drawn_[k] += 1;
    }
    x.indexed_ = R;
    x.guess_ = static_cast<size_t>(s.round_start);
    x.rec_task_ = s.rec_task;
    x.rec_round_ = s.rec_round;
    x.rec_prompt_.assign(s.rec_prompt.begin(), s.rec_prompt.end());
    x.rec_status_ = s.rec_status;
    need(s.acc_prompt.size(), s.acc_task.size(), "acc_prompt");
    std::vector<uint8_t> seen(R, 0);
    size_t n_accepted = 0;
    for (size_t i = 0; i < R; ++i) n_accepted += s.rec_status[i] == kAccepted;
    if (n_accepted != s.acc_task.size()) bad("state_dict['acc_task']: must list every accepted prompt once");
    for (size_t i = 0; i < s.acc_task.size(); ++i) {
      int64_t k = s.acc_task[i], p = s.acc_prompt[i];
      if (k < 0 || k >= K) bad("state_dict['acc_task'][", i, "] is out of range");
      const int64_t* v = (p >= 0 && p < c.pool_sizes[k]) ? x.rec_index_.find(key(k, p)) : nullptr;
      if (v == nullptr || x.rec_status_[*v] != kAccepted || seen[*v])
        bad("state_dict['acc_prompt'][", i, "] is not an accepted prompt of this step, or is listed twice");
      seen[*v] = 1;
      x.acc_[k].push_back(static_cast<uint32_t>(p));
    }
  } else if (!s.rec_task.empty() || !s.acc_task.empty()) {
    bad("state_dict['rec_task']: records given but no step is active");
  }
  *this = std::move(x);
}

}  // namespace sampler
}  // namespace mtgrpo
