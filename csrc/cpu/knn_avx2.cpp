#define HOTLOOP_ISA avx2
#include "knn_kernel.h"
