// LAMB CUDA kernels for float params (see lamb_cuda.cuh).
#include "lamb_cuda.cuh"

namespace fused_optim {
template const char* lamb_cuda_for<float>(const LambLaunch&, cudaStream_t);
}  // namespace fused_optim
