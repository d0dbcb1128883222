"""CPU implementations composed in Python from BLAS matmuls and the C++ kernels of hotloop._C."""
