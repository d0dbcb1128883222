// knn selection kernel compiled for the avx2 instruction set (see isa.h).
#if defined(__x86_64__)
#define HOTLOOP_ISA_TARGET HOTLOOP_ISA_AVX2_TARGET
#define HOTLOOP_ISA avx2
#include "isa.h"
#include "knn_kernel.h"
#endif
