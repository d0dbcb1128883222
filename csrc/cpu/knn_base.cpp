#define HOTLOOP_ISA base
#include "knn_kernel.h"
