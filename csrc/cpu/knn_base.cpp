// knn selection kernel compiled for the base instruction set (see isa.h).
#define HOTLOOP_ISA base
#include "isa.h"
#include "knn_kernel.h"
