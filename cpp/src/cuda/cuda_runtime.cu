// Optional CUDA path (RNNCORE_ENABLE_CUDA=ON). Today it reports the device status; the
// CUDA kernels will live beside this file.
#include <cuda_runtime.h>

#include <string>

#include "rnncore/runtime.hpp"

namespace rnncore {

bool cuda_built() { return true; }

bool cuda_available() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::string cuda_status() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return std::string("built, but no usable GPU: ") + cudaGetErrorString(e);
    if (n == 0) return "built, but no GPU found";
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    return std::string("built and usable: ") + p.name + " (" + std::to_string(n) + " device(s))";
}

}  // namespace rnncore
