// pybind11 glue of the ratio-preserving sampler (core: csrc/sampler/sampler.cpp).
// Every array is checked here (1-d, lengths agree) before the core sees a pointer; the
// core checks values (ranges, drawn-this-step, weights) and throws std::invalid_argument
// naming the argument, which pybind11 turns into ValueError. Call-order mistakes raise
// RuntimeError. The public Python class is mtgrpo_core.sampling.RatioPreservingSampler.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "mtgrpo/sampler.h"

namespace py = pybind11;
using mtgrpo::fail;
namespace smp = mtgrpo::sampler;

namespace {

template <typename T>
using carr = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
carr<T> as_1d(const py::handle& obj, const char* name) {
  carr<T> a;
  try {
    a = carr<T>::ensure(obj);
  } catch (const py::error_already_set&) {
    a = carr<T>();
  }
  if (!a) fail(name, ": expected a 1-d numeric array");
  if (a.ndim() != 1) fail(name, ": expected a 1-d array, got ", a.ndim(), "-d");
  return a;
}

template <typename T, typename V>
py::array_t<T> to_numpy(const std::vector<V>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  T* p = out.mutable_data();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<T>(v[i]);
  return out;
}

template <typename T>
std::vector<T> from_numpy(const py::dict& d, const char* key) {
  if (!d.contains(key)) fail("state_dict: missing key '", key, "'");
  std::string name = std::string("state_dict['") + key + "']";
  carr<T> a = as_1d<T>(d[key], name.c_str());
  return std::vector<T>(a.data(), a.data() + a.shape(0));
}

template <typename T>
T scalar(const py::dict& d, const char* key) {
  if (!d.contains(key)) fail("state_dict: missing key '", key, "'");
  try {
    return d[key].cast<T>();
  } catch (const py::cast_error&) {
    fail("state_dict['", key, "']: wrong type");
  }
}

// A state written before the refill / inflation / warm-up options existed ran the paper's
// deficit rule with per-step inflation and no warm-up: those are its values, so it resumes exactly.
template <typename T>
T scalar_or(const py::dict& d, const char* key, T legacy) {
  return d.contains(key) ? scalar<T>(d, key) : legacy;
}

smp::SamplerConfig make_config(const carr<int64_t>& pool_sizes, int64_t batch_size, double oversample,
                               int64_t max_rounds, double acceptance_cap, double rho_decay, const std::string& rounding,
                               bool acceptance_aware, const std::string& refill, const std::string& inflation,
                               int64_t warmup_steps) {
  smp::SamplerConfig c;
  c.pool_sizes.assign(pool_sizes.data(), pool_sizes.data() + pool_sizes.shape(0));
  c.batch_size = batch_size;
  c.oversample = oversample;
  c.max_rounds = max_rounds;
  c.acceptance_cap = acceptance_cap;
  c.rho_decay = rho_decay;
  c.rounding = smp::parse_rounding(rounding);
  c.acceptance_aware = acceptance_aware;
  c.refill = smp::parse_refill(refill);
  c.inflation = smp::parse_inflation(inflation);
  c.warmup_steps = warmup_steps;
  return c;
}

py::array_t<int64_t> target_counts(const py::object& weights, int64_t batch_size, const std::string& method,
                                   uint64_t seed) {
  carr<double> w = as_1d<double>(weights, "weights");
  const int64_t K = w.shape(0);
  if (K == 0) fail("weights: need at least one task, got 0");
  if (batch_size <= 0) fail("batch_size: must be positive, got ", batch_size);
  smp::check_weights(w.data(), K, K, "weights");
  smp::Rounding r = smp::parse_rounding(method);
  if (batch_size > smp::kMaxTotal) fail("batch_size: at most 2**53, got ", batch_size);
  if (r == smp::Rounding::Multinomial && batch_size > smp::kMaxMultinomialDraws)
    fail("batch_size: method='multinomial' allows at most 2**22 = ", smp::kMaxMultinomialDraws, ", got ", batch_size,
         " (one draw a prompt; use 'largest-remainder' for larger sizes)");
  smp::Pcg32 rng(seed);
  std::vector<int64_t> out(static_cast<size_t>(K));
  smp::apportion(w.data(), K, batch_size, r, rng, out.data());
  return to_numpy<int64_t>(out);
}

class PySampler {
 public:
  PySampler(const py::object& pool_sizes, int64_t batch_size, double oversample, int64_t max_rounds,
            double acceptance_cap, double rho_decay, const std::string& rounding, uint64_t seed, bool acceptance_aware,
            const std::string& refill, const std::string& inflation, int64_t warmup_steps)
      : s_(make_config(as_1d<int64_t>(pool_sizes, "pool_sizes"), batch_size, oversample, max_rounds, acceptance_cap,
                       rho_decay, rounding, acceptance_aware, refill, inflation, warmup_steps),
           seed) {}

  void start_step(const py::object& weights) {
    carr<double> w = as_1d<double>(weights, "weights");
    s_.start_step(w.data(), w.shape(0));
  }

  py::object next_round() {
    std::vector<int32_t> t;
    std::vector<int64_t> p;
    if (!s_.next_round(t, p)) return py::none();
    py::array_t<int32_t> ta(static_cast<py::ssize_t>(t.size()));
    py::array_t<int64_t> pa(static_cast<py::ssize_t>(p.size()));
    if (!t.empty()) {
      std::memcpy(ta.mutable_data(), t.data(), t.size() * sizeof(int32_t));
      std::memcpy(pa.mutable_data(), p.data(), p.size() * sizeof(int64_t));
    }
    return py::make_tuple(ta, pa);
  }

  void report(const py::object& task_ids, const py::object& prompt_indices, const py::object& accepted) {
    carr<int64_t> t = as_1d<int64_t>(task_ids, "task_ids");
    carr<int64_t> p = as_1d<int64_t>(prompt_indices, "prompt_indices");
    carr<uint8_t> a = as_1d<uint8_t>(accepted, "accepted");
    if (p.shape(0) != t.shape(0))
      fail("prompt_indices: length ", p.shape(0), " does not match task_ids length ", t.shape(0));
    if (a.shape(0) != t.shape(0)) fail("accepted: length ", a.shape(0), " does not match task_ids length ", t.shape(0));
    s_.report(t.data(), p.data(), a.data(), t.shape(0));
  }

  py::dict finish() {
    smp::Batch b = s_.finish();
    py::dict d;
    d["task_ids"] = to_numpy<int32_t>(b.task_ids);
    d["prompt_indices"] = to_numpy<int64_t>(b.prompt_indices);
    d["targets"] = to_numpy<int64_t>(b.targets);
    d["realized"] = to_numpy<int64_t>(b.realized);
    d["rounds"] = b.rounds;
    d["shortfall"] = b.shortfall;
    d["num_drawn"] = b.num_drawn;
    d["num_accepted"] = b.num_accepted;
    return d;
  }

  py::array_t<double> filtered_ratios() const { return to_numpy<double>(s_.filtered_ratios()); }
  bool step_active() const { return s_.step_active(); }
  int64_t num_tasks() const { return s_.num_tasks(); }

  py::dict state_dict() const {
    smp::SamplerState s = s_.state();
    py::dict d;
    d["format"] = "mtgrpo_core.RatioPreservingSampler/1";
    d["pool_sizes"] = to_numpy<int64_t>(s.config.pool_sizes);
    d["batch_size"] = s.config.batch_size;
    d["oversample"] = s.config.oversample;
    d["max_rounds"] = s.config.max_rounds;
    d["acceptance_cap"] = s.config.acceptance_cap;
    d["rho_decay"] = s.config.rho_decay;
    d["rounding"] = std::string(smp::rounding_name(s.config.rounding));
    d["acceptance_aware"] = s.config.acceptance_aware;
    d["refill"] = std::string(smp::refill_name(s.config.refill));
    d["inflation"] = std::string(smp::inflation_name(s.config.inflation));
    d["warmup_steps"] = s.config.warmup_steps;
    d["rng_state"] = s.rng_state;
    d["rng_inc"] = s.rng_inc;
    d["rho"] = to_numpy<double>(s.rho);
    d["steps_done"] = s.steps_done;
    d["perm_epoch"] = to_numpy<int64_t>(s.perm_epoch);
    d["perm_pos"] = to_numpy<int64_t>(s.perm_pos);
    d["perm_limit"] = to_numpy<int64_t>(s.perm_limit);
    d["perm_cursor"] = to_numpy<int64_t>(s.perm_cursor);
    d["perm_keys"] = to_numpy<int64_t>(s.perm_keys);
    d["park_task"] = to_numpy<int64_t>(s.park_task);
    d["park_prompt"] = to_numpy<int64_t>(s.park_prompt);
    d["step_active"] = s.step_active;
    d["step_weights"] = to_numpy<double>(s.step_weights);
    d["step_inflation"] = to_numpy<double>(s.step_inflation);
    d["step_targets"] = to_numpy<int64_t>(s.step_targets);
    d["step_rounds"] = s.step_rounds;
    d["round_open"] = s.round_open;
    d["round_start"] = s.round_start;
    d["rec_task"] = to_numpy<int32_t>(s.rec_task);
    d["rec_prompt"] = to_numpy<int64_t>(s.rec_prompt);
    d["rec_round"] = to_numpy<int32_t>(s.rec_round);
    d["rec_status"] = to_numpy<int8_t>(s.rec_status);
    d["acc_task"] = to_numpy<int32_t>(s.acc_task);
    d["acc_prompt"] = to_numpy<int64_t>(s.acc_prompt);
    return d;
  }

  void load_state_dict(const py::dict& d) {
    if (!d.contains("format") || scalar<std::string>(d, "format") != "mtgrpo_core.RatioPreservingSampler/1")
      fail("state_dict['format']: expected 'mtgrpo_core.RatioPreservingSampler/1'");
    smp::SamplerState s;
    s.config.pool_sizes = from_numpy<int64_t>(d, "pool_sizes");
    s.config.batch_size = scalar<int64_t>(d, "batch_size");
    s.config.oversample = scalar<double>(d, "oversample");
    s.config.max_rounds = scalar<int64_t>(d, "max_rounds");
    s.config.acceptance_cap = scalar<double>(d, "acceptance_cap");
    s.config.rho_decay = scalar<double>(d, "rho_decay");
    s.config.rounding = smp::parse_rounding(scalar<std::string>(d, "rounding"));
    s.config.acceptance_aware = scalar<bool>(d, "acceptance_aware");
    s.config.refill = smp::parse_refill(scalar_or<std::string>(d, "refill", "deficit"));
    s.config.inflation = smp::parse_inflation(scalar_or<std::string>(d, "inflation", "per-step"));
    s.config.warmup_steps = scalar_or<int64_t>(d, "warmup_steps", 0);
    s.rng_state = scalar<uint64_t>(d, "rng_state");
    s.rng_inc = scalar<uint64_t>(d, "rng_inc");
    s.rho = from_numpy<double>(d, "rho");
    s.steps_done = scalar<int64_t>(d, "steps_done");
    s.perm_epoch = from_numpy<int64_t>(d, "perm_epoch");
    s.perm_pos = from_numpy<int64_t>(d, "perm_pos");
    s.perm_limit = from_numpy<int64_t>(d, "perm_limit");
    s.perm_cursor = from_numpy<int64_t>(d, "perm_cursor");
    s.perm_keys = from_numpy<int64_t>(d, "perm_keys");
    s.park_task = from_numpy<int64_t>(d, "park_task");
    s.park_prompt = from_numpy<int64_t>(d, "park_prompt");
    s.step_active = scalar<bool>(d, "step_active");
    s.step_weights = from_numpy<double>(d, "step_weights");
    s.step_inflation = from_numpy<double>(d, "step_inflation");
    s.step_targets = from_numpy<int64_t>(d, "step_targets");
    s.step_rounds = scalar<int64_t>(d, "step_rounds");
    s.round_open = scalar<bool>(d, "round_open");
    s.round_start = scalar<int64_t>(d, "round_start");
    s.rec_task = from_numpy<int32_t>(d, "rec_task");
    s.rec_prompt = from_numpy<int64_t>(d, "rec_prompt");
    s.rec_round = from_numpy<int32_t>(d, "rec_round");
    s.rec_status = from_numpy<int8_t>(d, "rec_status");
    s.acc_task = from_numpy<int32_t>(d, "acc_task");
    s.acc_prompt = from_numpy<int64_t>(d, "acc_prompt");
    s_.load_state(s);
  }

 private:
  smp::RatioPreservingSampler s_;
};

}  // namespace

void register_sampler(py::module_& m) {
  m.def("sampler_target_counts", &target_counts, py::arg("weights"), py::arg("batch_size"), py::arg("method"),
        py::arg("seed"),
        "Target counts n_k summing to batch_size (largest-remainder or multinomial with PCG32(seed)).");
  py::class_<PySampler>(m, "RatioPreservingSamplerCore",
                        "C++ core of mtgrpo_core.sampling.RatioPreservingSampler (use that class).")
      .def(py::init<const py::object&, int64_t, double, int64_t, double, double, const std::string&, uint64_t, bool,
                    const std::string&, const std::string&, int64_t>(),
           py::arg("pool_sizes"), py::arg("batch_size"), py::arg("oversample"), py::arg("max_rounds"),
           py::arg("acceptance_cap"), py::arg("rho_decay"), py::arg("rounding"), py::arg("seed"),
           py::arg("acceptance_aware"), py::arg("refill") = "fill-then-deficit", py::arg("inflation") = "per-step",
           py::arg("warmup_steps") = 0)
      .def("start_step", &PySampler::start_step, py::arg("weights"))
      .def("next_round", &PySampler::next_round)
      .def("report", &PySampler::report, py::arg("task_ids"), py::arg("prompt_indices"), py::arg("accepted"))
      .def("finish", &PySampler::finish)
      .def("filtered_ratios", &PySampler::filtered_ratios)
      .def("step_active", &PySampler::step_active)
      .def("num_tasks", &PySampler::num_tasks)
      .def("state_dict", &PySampler::state_dict)
      .def("load_state_dict", &PySampler::load_state_dict, py::arg("state"));
}
