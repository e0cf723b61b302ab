// Adafactor CUDA passes 1 and 3 for fp16_t params (see adafactor_cuda.cuh).
#include "adafactor_cuda.cuh"

namespace fused_optim {
template const char* adafactor_cuda_for<fp16_t>(const AdafactorLaunch&, cudaStream_t);
}  // namespace fused_optim
