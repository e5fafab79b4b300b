// Ratio-preserving sampler with acceptance-aware sampling (MT-GRPO, arXiv 2602.05547,
// Sec. "RP sampler"; spec: shared/spec/ALGORITHMS.md 2.3). Framework-free C++17: no
// Python, no torch, no pybind11. Bad input throws std::invalid_argument naming the
// argument; a call made in the wrong order throws std::runtime_error. Nothing aborts.
//
// Determinism: every random decision comes from one PCG32 stream (O'Neill 2014, XSH-RR
// 64/32, the reference constants) through three derived operations, defined exactly so
// the pure-Python oracle (mtgrpo_core/reference/sampler.py) reproduces them bit for bit:
//   next_u32()      the PCG32 output
//   next_double()   ((u32 >> 5) * 2^26 + (u32' >> 6)) / 2^53, a 53-bit double in [0, 1)
//   bounded(n)      Lemire's multiply-and-reject map of u32 to [0, n), n < 2^32
// Floating-point work is limited to O(K) products and sums per round; every inexact product
// goes through no_contract_mul (a volatile store) so no compiler can fuse it into an FMA,
// which would change rounding on FMA targets (aarch64, -march=native) and break equality
// with Python's doubles (checked: -march=haswell -ffp-contract=fast gives the same batches;
// the one FMA left, in next_double, adds exact integers below 2^53). Pool order: see
// LazyPermutation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mtgrpo {
namespace sampler {

// ---------------------------------------------------------------------------- PRNG
struct Pcg32 {
  static constexpr uint64_t kMult = 6364136223846793005ULL;
  static constexpr uint64_t kStream = 0xda3e39cb94b95bdbULL;  // fixed stream selector
  uint64_t state = 0;
  uint64_t inc = 1;

  Pcg32() { seed(0); }
  explicit Pcg32(uint64_t s) { seed(s); }
  // pcg32_srandom_r(initstate = s, initseq = kStream)
  void seed(uint64_t s) {
    state = 0;
    inc = (kStream << 1u) | 1u;
    next_u32();
    state += s;
    next_u32();
  }
  uint32_t next_u32() {
    uint64_t old = state;
    state = old * kMult + inc;
    uint32_t xorshifted = static_cast<uint32_t>(((old >> 18u) ^ old) >> 27u);
    uint32_t rot = static_cast<uint32_t>(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((32u - rot) & 31u));
  }
  double next_double() {
    uint32_t a = next_u32() >> 5;
    uint32_t b = next_u32() >> 6;
    return (static_cast<double>(a) * 67108864.0 + static_cast<double>(b)) * (1.0 / 9007199254740992.0);
  }
  // Uniform integer in [0, n), 1 <= n < 2^32 (Lemire 2019, "Fast random integer
  // generation in an interval", Algorithm 5).
  uint32_t bounded(uint32_t n) {
    uint64_t m = static_cast<uint64_t>(next_u32()) * n;
    uint32_t l = static_cast<uint32_t>(m);
    if (l < n) {
      uint32_t t = static_cast<uint32_t>(0u - n) % n;
      while (l < t) {
        m = static_cast<uint64_t>(next_u32()) * n;
        l = static_cast<uint32_t>(m);
      }
    }
    return static_cast<uint32_t>(m >> 32);
  }
};

enum class Rounding { LargestRemainder, Multinomial };

// Size bounds (documented in mtgrpo_core.sampling): every total above 2^53 is refused
// (float(total) would be inexact, so |n_k - z_k T| < 1 could not hold), and a multinomial
// total above 2^22 too (it costs one draw a prompt; see SamplerConfig::validate).
constexpr int64_t kMaxTotal = int64_t(1) << 53;
constexpr int64_t kMaxMultinomialDraws = int64_t(1) << 22;
Rounding parse_rounding(const std::string& name);  // throws invalid_argument naming "rounding"
const char* rounding_name(Rounding r);

// What rounds after the first draw from (MT-GRPO's resampling rule):
//   FillThenDeficit  "fill-then-deficit": z*m while fewer than B prompts are accepted in
//                    total, then deficit*m (the released MT-GRPO trainer's order);
//   Deficit          "deficit": deficit*m from round 2 on (the paper's Algorithm 2).
// deficit_k = max(n_k - c_k, 0); a step ends when no deficit is left in both rules.
enum class Refill { FillThenDeficit, Deficit };
Refill parse_refill(const std::string& name);  // throws invalid_argument naming "refill"
const char* refill_name(Refill r);
// When the inflation m_k = min(1 / (1 - rho_k), cap) is computed: once at start_step
// (PerStep, "per-step") or again before every round from the rho updated by the rounds
// reported so far (PerRound, "per-round", the released trainer).
enum class Inflation { PerStep, PerRound };
Inflation parse_inflation(const std::string& name);  // throws invalid_argument naming "inflation"
const char* inflation_name(Inflation r);

// Splits `total` into K non-negative counts in proportion to w (w_k >= 0 finite, sum > 0;
// zero-weight entries get 0). LargestRemainder: floor(z_k T) plus one for the largest
// remainders (ties to the lower index); |n_k - z_k T| < 1. T <= kMaxTotal (and
// <= kMaxMultinomialDraws for Multinomial), else invalid_argument. Multinomial: T categorical
// draws by inverse CDF on next_double(). z_k = w_k / sum(w), the sum taken left to right.
void apportion(const double* w, int64_t K, int64_t total, Rounding method, Pcg32& rng, int64_t* out);

// Validates weights (length K, finite, >= 0, sum within 1e-6 of 1) and throws
// invalid_argument naming `name` otherwise.
void check_weights(const double* w, int64_t n, int64_t K, const char* name);

// ---------------------------------------------------------------------------- pools
// Open-addressing hash map uint64 -> int64 (linear probing, Fibonacci hashing, load <= 1/2).
// Key and value share a 16-byte slot so a lookup touches one cache line; prefetch() lets
// loops over random keys overlap their cache misses (the sampler's cost is memory latency).
class U64Map {
 public:
  static constexpr uint64_t kEmpty = ~0ULL;
  struct Slot {
    uint64_t key;
    int64_t val;
  };
  U64Map() { reset(16); }
  size_t size() const { return size_; }
  void clear();
  void reserve(size_t n) {
    while (2 * n > slots_.size()) grow();
  }
  const int64_t* find(uint64_t key) const;
  int64_t* find(uint64_t key);
  void put(uint64_t key, int64_t val);
  void prefetch(uint64_t key) const {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(&slots_[slot(key)]);
#endif
  }
  template <typename F>
  void for_each(F&& f) const {
    for (const Slot& sl : slots_)
      if (sl.key != kEmpty) f(sl.key, sl.val);
  }

 private:
  void reset(size_t cap);
  void grow();
  size_t slot(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ULL) >> shift_); }
  std::vector<Slot> slots_;
  size_t size_ = 0;
  unsigned shift_ = 60;
};

// A pseudo-random permutation of [0, n) evaluated lazily: O(1) memory and O(1) work a
// draw, whatever n (pools of 10^6+ prompts cost nothing until drawn, and the state is a few
// numbers). The epoch's order is pi(0), pi(1), ... with pi a keyed 4-round Feistel network
// on 2h bits (2^(2h) >= n, h >= 1) restricted to [0, n) by cycle walking (Black & Rogaway
// 2002); the four 32-bit round keys are drawn from the sampler's PCG32 when the epoch starts.
// Round function: f(R, k) = mix32(R ^ k) & (2^h - 1), mix32 = murmur3-style multiply/xorshift.
// Epochs and steps: `limit` < n only inside a step that wrapped the epoch. The d prompts this
// step drew before the wrap are `parked`: the new epoch yields every other prompt first (in pi
// order, skipping parked ones) and the parked ones last, so no prompt comes twice in a step
// and each prompt still comes exactly once per epoch.
class LazyPermutation {
 public:
  explicit LazyPermutation(uint32_t n = 0);
  uint32_t n() const { return n_; }
  uint32_t pos() const { return pos_; }
  uint32_t limit() const { return limit_; }
  uint32_t cursor() const { return cursor_; }
  int64_t epoch() const { return epoch_; }
  const uint32_t* keys() const { return keys_; }
  const std::vector<uint32_t>& parked() const { return parked_; }
  void set_keys(Pcg32& rng);  // four next_u32() calls
  uint32_t draw();            // needs pos < limit
  // Starts the next epoch (new keys from rng) with `d` prompts parked at its end.
  void new_epoch(Pcg32& rng, const uint32_t* parked, size_t d);
  void end_step() { limit_ = n_; }
  void restore(int64_t epoch, uint32_t pos, uint32_t limit, uint32_t cursor, const uint32_t* keys,
               const std::vector<uint32_t>& parked);  // throws invalid_argument if inconsistent
  uint32_t feistel(uint32_t x) const;                 // the bijection on [0, 2^(2h))
  uint32_t pi(uint32_t i) const;                      // cycle walk into [0, n)

 private:
  uint32_t n_ = 0, pos_ = 0, limit_ = 0, cursor_ = 0;
  unsigned h_ = 1;
  uint32_t mask_ = 1;
  int64_t epoch_ = 0;
  uint32_t keys_[4] = {0, 0, 0, 0};
  std::vector<uint32_t> parked_;
  U64Map parked_set_;
};

// ---------------------------------------------------------------------------- sampler
struct SamplerConfig {
  std::vector<int64_t> pool_sizes;
  int64_t batch_size = 0;
  double oversample = 3.0;
  int64_t max_rounds = 10;
  double acceptance_cap = 5.0;
  double rho_decay = 0.9;
  Rounding rounding = Rounding::LargestRemainder;
  bool acceptance_aware = true;
  Refill refill = Refill::FillThenDeficit;
  Inflation inflation = Inflation::PerStep;
  // Steps (counted by steps_done) during which task ratios are not enforced: rounds draw
  // from z*m until B prompts are accepted in total and finish() picks B of all accepted
  // prompts uniformly, whatever their task (the released Exp-2 scripts: 10 steps).
  int64_t warmup_steps = 0;
  void validate() const;       // throws invalid_argument naming the field
  int64_t round_size() const;  // floor(oversample * batch_size + 0.5), at least 1
};

struct Batch {
  std::vector<int32_t> task_ids;
  std::vector<int64_t> prompt_indices;
  std::vector<int64_t> targets, realized;
  int64_t rounds = 0, shortfall = 0, num_drawn = 0, num_accepted = 0;
};

// The whole mutable state, flat, in the layout of state_dict() (see the Python docs).
struct SamplerState {
  SamplerConfig config;
  uint64_t rng_state = 0, rng_inc = 0;
  std::vector<double> rho;
  int64_t steps_done = 0;
  std::vector<int64_t> perm_epoch, perm_pos, perm_limit, perm_cursor;
  std::vector<int64_t> perm_keys;  // K x 4, row-major
  std::vector<int64_t> park_task, park_prompt;
  bool step_active = false;
  std::vector<double> step_weights, step_inflation;
  std::vector<int64_t> step_targets;
  int64_t step_rounds = 0;
  bool round_open = false;
  int64_t round_start = 0;
  std::vector<int32_t> rec_task, rec_round;
  std::vector<int64_t> rec_prompt;
  std::vector<int8_t> rec_status;
  std::vector<int32_t> acc_task;
  std::vector<int64_t> acc_prompt;
};

class RatioPreservingSampler {
 public:
  RatioPreservingSampler(const SamplerConfig& cfg, uint64_t seed);
  int64_t num_tasks() const { return static_cast<int64_t>(cfg_.pool_sizes.size()); }
  const SamplerConfig& config() const { return cfg_; }
  const std::vector<double>& filtered_ratios() const { return rho_; }
  bool step_active() const { return active_; }

  void start_step(const double* weights, int64_t n);
  // Appends the round's prompts (grouped by task, ascending) and returns true, or returns
  // false when every quota is met, max_rounds were drawn or nothing is left to draw.
  bool next_round(std::vector<int32_t>& task_ids, std::vector<int64_t>& prompt_indices);
  void report(const int64_t* task_ids, const int64_t* prompt_indices, const uint8_t* accepted, int64_t n);
  Batch finish();

  SamplerState state() const;
  void load_state(const SamplerState& s);  // validates; leaves *this unchanged on error

 private:
  enum Status : int8_t { kUnreported = 0, kAccepted = 1, kRejected = 2, kPending = 3 };
  void require_active(const char* what) const;
  void close_round();
  void clear_step_records();  // forget this step's draws, reports and accepted prompts
  void compute_inflation();   // m_ from rho_ (1 when not acceptance-aware)
  bool in_warmup() const { return steps_done_ < cfg_.warmup_steps; }
  static uint64_t key(int64_t task, int64_t prompt) {
    return (static_cast<uint64_t>(task) << 32) | static_cast<uint64_t>(prompt);
  }

  SamplerConfig cfg_;
  int64_t R_ = 0;
  Pcg32 rng_;
  std::vector<double> rho_;
  int64_t steps_done_ = 0;
  std::vector<LazyPermutation> perms_;
  // step state
  bool active_ = false;
  std::vector<double> z_, m_;
  std::vector<int64_t> n_;
  int64_t rounds_ = 0;
  bool round_open_ = false;
  int64_t round_start_ = 0;
  std::vector<int32_t> rec_task_, rec_round_;
  std::vector<uint32_t> rec_prompt_;
  std::vector<int8_t> rec_status_;
  // key(task, prompt) -> record index, built lazily: report() first tries the record after
  // the last one it matched (callers usually report in draw order), so the hash map (one
  // cache miss a prompt) is only filled when a report arrives out of order.
  U64Map rec_index_;
  size_t indexed_ = 0;  // records [0, indexed_) are in rec_index_
  size_t guess_ = 0;    // record expected next in report()
  void ensure_index();
  int64_t lookup(int64_t task, int64_t prompt, size_t guess);  // record index or -1
  std::vector<int64_t> drawn_;                                 // per task, this step
  std::vector<std::vector<uint32_t>> acc_;                     // per task, accepted prompts in report order
};

}  // namespace sampler
}  // namespace mtgrpo
