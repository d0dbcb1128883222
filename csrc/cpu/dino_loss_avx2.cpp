#define HOTLOOP_ISA avx2
#include "dino_loss_kernel.h"
