// float instantiation of the interval-attention CUDA kernels (one file per dtype: parallel builds).
#include "cuda/interval_attn_kernels.cuh"

namespace hierkern::cuda {
template void launch_fwd<float>(const AttnArgs&, cudaStream_t);
template void launch_bwd<float>(const AttnArgs&, cudaStream_t);
}  // namespace hierkern::cuda
