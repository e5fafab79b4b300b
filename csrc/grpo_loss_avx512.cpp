// The fused GRPO loss's float kernel compiled for AVX512 (see grpo_loss_isa.h). No FMA
// contraction, as in grpo_loss.cpp: every ISA version computes the same bits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "grpo_loss_isa.h"

#ifdef MTGRPO_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")
#define MTGRPO_VEC_NS isa_avx512
#define MTGRPO_VEC_WIDTH 16
#include "mtgrpo/grpo_loss.h"
#undef MTGRPO_VEC_WIDTH
#undef MTGRPO_VEC_NS
#pragma GCC pop_options

#ifndef MTGRPO_COST_MODEL_PROBE  // bench/cost_model: only the probe's own instantiations
mtgrpo::FloatKernels mtgrpo::float_kernels_avx512() {
  return {isa_avx512::float_items, isa_avx512::float_seq_items, isa_avx512::float_coef_items, "avx512"};
}
#endif
#endif
