// The float kernel of the fused GRPO loss, one version per x86 instruction set, each compiled in
// its own translation unit (grpo_loss_avx512.cpp, grpo_loss_avx2.cpp) so that the versions build
// in parallel and are cached separately; csrc/grpo_loss.cpp picks one at load time.
#ifndef MTGRPO_GRPO_LOSS_ISA_H
#define MTGRPO_GRPO_LOSS_ISA_H

#include "mtgrpo/grpo_loss.h"

namespace mtgrpo {

using ItemsFn = void (*)(const FloatJob&, int64_t, int64_t);
struct FloatKernels {
  ItemsFn items;       // the fused forward + backward over items [k0, k1)
  ItemsFn seq_items;   // GSPO pre-pass
  ItemsFn coef_items;  // GSPO with token advantages, second pre-pass
  const char* isa;
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTGRPO_X86_DISPATCH 1
FloatKernels float_kernels_avx512();
FloatKernels float_kernels_avx2();
#endif

}  // namespace mtgrpo

#endif  // MTGRPO_GRPO_LOSS_ISA_H
