#define HOTLOOP_ISA avx2
#include "token_stats_kernel.h"
