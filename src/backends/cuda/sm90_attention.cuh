// The Hopper attention kernel's launcher (attention_sm90.cu), called by
// launch_attention (attention.cu) when sm90_attention_supported() and
// sm90_attention_wanted() (sm90_switch.cuh).
#pragma once

#include <cuda_runtime.h>

#include "backends/cuda/kernels.cuh"
#include "backends/cuda/sm90_switch.cuh"

namespace moba::backends::cuda::detail {

/// Same contract as launch_attention: the same three modes, the same
/// outputs (partials and their lse in past mode; out and lse otherwise).
cudaError_t launch_attention_sm90(Elem elem, AttnMode mode, const AttnArgs& a, cudaStream_t stream);

}  // namespace moba::backends::cuda::detail
