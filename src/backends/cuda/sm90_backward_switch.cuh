// Host-side switch between the two key-major dK/dV kernels of the CUDA
// backward: the Hopper kernel (backward_sm90.cu: wgmma, warp-specialised,
// 128-key tiles, sm_90a only) and the mma.sync kernel (backward_mma.cu:
// every architecture, 64-key tiles). Plain C++ (no CUDA headers), so tests
// can include it.
#pragma once

namespace moba::backends::cuda::detail {

/// Whether the Hopper backward kernels run without being asked for: yes. On an
/// H100 they halve config P's backward (128K: 1,219 -> 619 ms, 1M: 11,861 ->
/// 6,008 ms against the mma.sync kernels, same process settings otherwise);
/// they pass their device suite CudaBackwardSm90.* there, memcheck and
/// racecheck clean on a subset (docs/cuda_backward.md, "Hopper kernels").
/// MOBA_CUDA_SM90_BWD=0 opts out.
inline constexpr bool kSm90BackwardByDefault = true;

/// Whether the Hopper dK/dV kernel should run: MOBA_CUDA_SM90_BWD=1 (or the
/// override) forces it, =0 forbids it; unset, it runs where
/// kSm90BackwardByDefault allows and the mode is dense or the blocks have at
/// least kSm90MinBlockSize keys (the forward's rule, sm90_switch.cuh).
bool bwd_sm90_wanted(bool dense, int block_size);

/// Overrides MOBA_CUDA_SM90_BWD for this process: 1 forces, 0 forbids, -1
/// goes back to the environment's choice. Tests use it to run both kernels on
/// the same inputs; not meant to be changed while backwards are in flight on
/// other threads.
void set_sm90_backward_override(int allow);

/// Whether the current device can run the Hopper dK/dV kernel: what
/// sm90_attention_supported() says (compute capability 9.x, sm_90a code
/// loaded) and the kernel's own sm_90a body in the loaded code.
bool bwd_sm90_supported();

/// Whether the query-major dq passes run on the Hopper dq kernel
/// (backward_dq_sm90.cu) where the Hopper dK/dV kernel runs (both wanted and
/// supported): yes unless MOBA_CUDA_SM90_BWD_DQ=0 (or the override 0) keeps
/// them on the mma.sync kernel, and only where the loaded code has that
/// kernel's sm_90a body. Call it only where bwd_sm90_supported() holds.
bool bwd_sm90_dq_enabled();

/// Overrides MOBA_CUDA_SM90_BWD_DQ for this process: 0 forbids the Hopper dq
/// kernel, 1 allows it, -1 goes back to the environment's choice. Tests use
/// it to switch the dK/dV kernel alone; same caveat as above.
void set_sm90_backward_dq_override(int allow);

/// Whether the fast mode fuses dq into the Hopper dK/dV kernel by default
/// (dQ = dS K per row step, added to fp32 sums by atomics; the dq passes
/// then do not run): docs/cuda_backward.md, "Fused dq".
inline constexpr bool kSm90FusedDqByDefault = true;

/// Whether a fast-mode backward that runs the Hopper dK/dV kernel fuses dq
/// into it: MOBA_CUDA_SM90_BWD_FUSED_DQ=0 (or the override 0) keeps the dq
/// passes, =1 (or 1) fuses; unset, kSm90FusedDqByDefault decides. The
/// deterministic mode never fuses (the atomics' order varies).
bool bwd_sm90_fused_dq_enabled();

/// Overrides MOBA_CUDA_SM90_BWD_FUSED_DQ for this process: 0 forbids, 1
/// allows, -1 goes back to the environment's choice; same caveat as above.
void set_sm90_backward_fused_dq_override(int allow);

}  // namespace moba::backends::cuda::detail
