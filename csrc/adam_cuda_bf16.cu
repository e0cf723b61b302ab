// Adam / AdamW CUDA kernels for bf16_t params (see adam_cuda.cuh).
#include "adam_cuda.cuh"

namespace fused_optim {
template const char* adam_cuda_for<bf16_t>(const AdamLaunch&, cudaStream_t);
}  // namespace fused_optim
