// Host-side switch between the two attention kernels of the CUDA forward:
// the Hopper kernel (attention_sm90.cu: wgmma, warp-specialised, sm_90a only)
// and the mma.sync kernel (attention.cu: every architecture). Plain C++ (no
// CUDA headers), so tests can include it.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace moba::backends::cuda::detail {

/// A process-wide on/off knob of the Hopper kernels: an override for tests
/// (set_override: -1 none, 0 off, 1 on) over an environment variable read
/// once, when the knob is first used (unset or empty: no say; "0": off;
/// anything else: on). Meant as a function-local static.
class ProcessSwitch {
 public:
  explicit ProcessSwitch(const char* env_name) : env_(read_env(env_name)) {}
  /// 0 or 1 where the override or else the environment says so, -1 where
  /// neither does.
  int forced() const {
    const int o = override_.load(std::memory_order_relaxed);
    return o >= 0 ? o : env_;
  }
  /// Whether the knob is on, `fallback` where nothing forces it.
  bool on(bool fallback) const {
    const int f = forced();
    return f >= 0 ? f != 0 : fallback;
  }
  void set_override(int value) {
    override_.store(value < 0 ? -1 : (value != 0 ? 1 : 0), std::memory_order_relaxed);
  }

 private:
  static int read_env(const char* name) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') return -1;
    return std::strcmp(v, "0") == 0 ? 0 : 1;
  }
  const int env_;
  std::atomic<int> override_{-1};
};

/// Blocks below this size keep the mma.sync kernel in the routed modes by
/// default: on an H100, config S (block 128) ran its forward in 148 ms with
/// mma.sync and 179 ms with the Hopper kernel (short key loops do not fill its
/// pipeline), while config P (block 4096) went from 2,672 to 2,148 ms. Sizes in
/// between were not measured; 1024 keeps at least 8 key tiles per past block.
inline constexpr int kSm90MinBlockSize = 1024;

/// Whether the Hopper kernel should run this mode: MOBA_CUDA_SM90=1 (or the
/// override) forces it, =0 forbids it; unset, it runs the dense mode and the
/// routed modes of blocks of at least kSm90MinBlockSize keys.
bool sm90_attention_wanted(bool dense, int block_size);

/// Overrides MOBA_CUDA_SM90 for this process: 1 forces, 0 forbids, -1 goes
/// back to the environment's choice. Tests use it to run both kernels on the
/// same inputs; it is not meant to be changed while forwards are in flight on
/// other threads.
void set_sm90_attention_override(int allow);

/// K/V pipeline stages of the Hopper kernel unless MOBA_CUDA_SM90_STAGES=2
/// (the first version's two stages with two Q buffers) or the override says
/// otherwise (attention_sm90.cu and docs/cuda_forward.md say why).
inline constexpr int kSm90DefaultStages = 3;

/// Overrides MOBA_CUDA_SM90_STAGES for this process: 2 or 3 pins the stage
/// count, anything else goes back to the environment's choice. For tests and
/// A/B runs in one process; like set_sm90_attention_override, not meant to
/// be changed while forwards are in flight on other threads.
void set_sm90_stages_override(int stages);

/// Overrides MOBA_CUDA_SM90_OVERLAP for this process: 1 turns the consumers'
/// intra-warpgroup overlap on, 0 off, -1 goes back to the environment's
/// choice (default on; MOBA_CUDA_SM90_OVERLAP=0 turns it off). Same caveat as above.
void set_sm90_overlap_override(int overlap);

/// Whether the current device can run the Hopper kernel: compute capability
/// 9.x and sm_90a code for it in this binary (regardless of the switch).
bool sm90_attention_supported();

}  // namespace moba::backends::cuda::detail
