// Picks the DINO loss kernel compiled for the best instruction set this CPU has (dino_loss_kernel.h).
#include "dino_loss.h"

#include "isa.h"

namespace hotloop::cpu {

#define HOTLOOP_DECLARE_ISA(ns) \
  namespace ns {                \
  void dino_loss(const DinoLossParams& p); \
  }
HOTLOOP_DECLARE_ISA(base)
#if defined(__x86_64__)
HOTLOOP_DECLARE_ISA(avx2)
HOTLOOP_DECLARE_ISA(avx512)
#endif
#undef HOTLOOP_DECLARE_ISA

void dino_loss(const DinoLossParams& p) {
  switch (runtime_isa()) {
#if defined(__x86_64__)
    case Isa::avx512: return avx512::dino_loss(p);
    case Isa::avx2: return avx2::dino_loss(p);
#endif
    default: return base::dino_loss(p);
  }
}

}  // namespace hotloop::cpu
