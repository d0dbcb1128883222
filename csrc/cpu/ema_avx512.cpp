#define HOTLOOP_ISA avx512
#include "ema_kernel.h"
