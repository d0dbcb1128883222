// Picks the DINO loss kernel compiled for the best instruction set this CPU has (dino_loss_kernel.h).
#include "dino_loss.h"

#include "isa.h"

namespace hotloop::cpu {

HOTLOOP_ISA_DECLARE(void dino_loss(const DinoLossParams& p))

void dino_loss(const DinoLossParams& p) { HOTLOOP_ISA_PICK(dino_loss)(p); }

}  // namespace hotloop::cpu
