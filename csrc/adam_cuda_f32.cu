// Adam / AdamW CUDA kernels for float params (see adam_cuda.cuh).
#include "adam_cuda.cuh"

namespace fused_optim {
template const char* adam_cuda_for<float>(const AdamLaunch&, cudaStream_t);
}  // namespace fused_optim
