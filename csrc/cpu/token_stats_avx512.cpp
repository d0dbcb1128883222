#define HOTLOOP_ISA avx512
#include "token_stats_kernel.h"
