// token_stats kernels compiled for the base instruction set (see isa.h).
#define HOTLOOP_ISA base
#include "isa.h"
#include "token_stats_kernel.h"
