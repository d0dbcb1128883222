#define HOTLOOP_ISA base
#include "ema_kernel.h"
