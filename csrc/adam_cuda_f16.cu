// Adam / AdamW CUDA kernels for fp16_t params (see adam_cuda.cuh).
#include "adam_cuda.cuh"

namespace fused_optim {
template const char* adam_cuda_for<fp16_t>(const AdamLaunch&, cudaStream_t);
}  // namespace fused_optim
