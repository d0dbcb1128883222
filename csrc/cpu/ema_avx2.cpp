#define HOTLOOP_ISA avx2
#include "ema_kernel.h"
