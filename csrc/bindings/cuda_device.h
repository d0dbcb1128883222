// Device queries shared by the CUDA bindings (*_cuda.cpp), from c10 and the CUDA runtime alone:
// ATen/cuda/CUDAContext.h would also pull in the cuBLAS / cuSPARSE / cuSOLVER headers, which a CUDA toolkit
// with just nvcc and cudart (e.g. the pip nvidia-cuda-* wheels) does not have, and which these files never use.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace hotloop::bind {

// Multiprocessor count of the current CUDA device (a host-side lookup in the runtime, no synchronisation).
inline int32_t current_sm_count() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return static_cast<int32_t>(sms);
}

}  // namespace hotloop::bind
