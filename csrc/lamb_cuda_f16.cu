// LAMB CUDA kernels for fp16_t params (see lamb_cuda.cuh).
#include "lamb_cuda.cuh"

namespace fused_optim {
template const char* lamb_cuda_for<fp16_t>(const LambLaunch&, cudaStream_t);
}  // namespace fused_optim
