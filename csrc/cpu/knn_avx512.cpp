// knn selection kernel compiled for the avx512 instruction set (see isa.h).
#if defined(__x86_64__)
#define HOTLOOP_ISA_TARGET HOTLOOP_ISA_AVX512_TARGET
#define HOTLOOP_ISA avx512
#include "isa.h"
#include "knn_kernel.h"
#endif
