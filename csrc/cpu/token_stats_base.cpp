#define HOTLOOP_ISA base
#include "token_stats_kernel.h"
