#define HOTLOOP_ISA avx512
#include "knn_kernel.h"
