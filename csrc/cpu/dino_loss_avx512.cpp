#define HOTLOOP_ISA avx512
#include "dino_loss_kernel.h"
