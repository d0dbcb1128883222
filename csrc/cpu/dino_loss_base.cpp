#define HOTLOOP_ISA base
#include "dino_loss_kernel.h"
