// DINO loss kernel compiled for the base instruction set (see isa.h).
#define HOTLOOP_ISA base
#include "isa.h"
#include "dino_loss_kernel.h"
