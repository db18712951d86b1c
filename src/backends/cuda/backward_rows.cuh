// Device code shared by the two key-major dK/dV kernels of the CUDA backward:
// dkv_kernel (backward_mma.cu, mma.sync, 64-key tiles) and dkv_sm90_kernel
// (backward_sm90.cu, wgmma, 128-key tiles). Both decode a work item into its
// key tile the same way and stream the same gathered rows in the same order
// (so the fp32 sums per key have a fixed order in deterministic mode); only
// the tile width, the shared-memory layout and the products differ.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "backends/cuda/attention_common.cuh"
#include "backends/cuda/backward.cuh"

namespace moba::backends::cuda::detail {

// One gathered row of the key-major kernels.
struct KvRow {
  int64_t q, dout;  // element offsets; -1 for padding
  float lse2;       // lse in base 2
  float delta;
  int pos;  // position (causal mask); INT_MAX for past entries, -1 for padding
  int dq;   // (row - the chunk's first row) x heads_q + head: its dq_acc row; -1 for padding
};

// The key tile of a work item: keys [t0, t1) of sequence b (positions within
// it), in block gb (global index), for kv head kvh.
struct KvTile {
  int kvh, gb, b;
  int t0, t1;
  int bhi;  // end of the block
};

// Work item -> key tile, key tiles fastest (the CTAs of one block read the
// same gathered rows, close together in time), then blocks, then kv heads.
// False when the tile lies beyond its block (a short last block) or the
// block beyond the batch.
template <int kKeyTile>
__device__ __forceinline__ bool decode_kv_tile(const BwdArgs& a, int64_t item, KvTile& kt) {
  const AttnArgs& f = a.f;
  const SeqTable& st = f.seq;
  const int sub = static_cast<int>(item % a.key_tiles_per_block);
  const int64_t rest = item / a.key_tiles_per_block;
  kt.gb = static_cast<int>(rest % f.blocks_bound);
  kt.kvh = static_cast<int>(rest / f.blocks_bound);
  if (kt.gb >= st.block_begin[st.batch]) return false;
  kt.b = upper_index(st.block_begin, st.batch + 1, kt.gb);
  const int len_k = st.k_begin[kt.b + 1] - st.k_begin[kt.b];
  const int blo = (kt.gb - st.block_begin[kt.b]) * f.block_size;
  kt.bhi = min(blo + f.block_size, len_k);
  kt.t0 = blo + sub * kKeyTile;
  kt.t1 = min(kt.t0 + kKeyTile, kt.bhi);
  return kt.t0 < kt.bhi;
}

// Where the rows of a key tile come from, in kBwdRowTile-row steps:
//   1. current rows: queries at positions [t0, last] among the chunk's rows
//      [row0, row1), head by head (cur_per_head steps per head);
//   2. past entries: the bucket's list lists[eb, ee).
struct KvRowSource {
  int cur_tiles, cur_per_head, ncur;
  int row_first, pos_first, head0;
  int eb, ee;
  int chunk_row0;
  int n_tiles;  // row steps in all (0: nothing of this chunk attends to the tile)
};

__device__ __forceinline__ KvRowSource kv_row_source(const BwdArgs& a, const KvTile& kt, int row0,
                                                     int row1) {
  const AttnArgs& f = a.f;
  const SeqTable& st = f.seq;
  // Query i sits at position shift + i.
  const int q0 = st.q_begin[kt.b];
  const int len_q = st.q_begin[kt.b + 1] - q0;
  const int len_k = st.k_begin[kt.b + 1] - st.k_begin[kt.b];
  const int shift = len_k - len_q;
  const int last = a.dense ? len_k - 1 : kt.bhi - 1;
  const int i_first = max(max(0, kt.t0 - shift), row0 - q0);
  const int i_last = min(last - shift, row1 - 1 - q0);
  KvRowSource s;
  s.ncur = max(0, i_last - i_first + 1);
  s.cur_per_head = (s.ncur + kBwdRowTile - 1) / kBwdRowTile;
  s.cur_tiles = s.cur_per_head * f.group;
  s.row_first = q0 + i_first;
  s.pos_first = shift + i_first;
  s.head0 = kt.kvh * f.group;
  s.eb = s.ee = 0;
  if (a.sel != nullptr) {
    const int64_t bucket = static_cast<int64_t>(kt.kvh) * f.blocks_bound + kt.gb;
    s.eb = a.seg_begin[bucket];
    s.ee = a.seg_end[bucket];
  }
  s.chunk_row0 = row0;
  s.n_tiles = s.cur_tiles + (s.ee - s.eb + kBwdRowTile - 1) / kBwdRowTile;
  return s;
}

// Row r of row step `tile`: its q / dO offsets, lse, delta and position.
__device__ __forceinline__ KvRow kv_row(const BwdArgs& a, const KvRowSource& s, int tile, int r) {
  const AttnArgs& f = a.f;
  int row = -1, head = 0, pos = -1;
  const int ct = s.cur_tiles;
  if (tile < ct) {
    const int per_head = s.cur_per_head;
    const int g = tile / per_head;
    const int j = (tile - g * per_head) * kBwdRowTile + r;
    if (j < s.ncur) {
      row = s.row_first + j;
      head = s.head0 + g;
      pos = s.pos_first + j;
    }
  } else {
    const int j = s.eb + (tile - ct) * kBwdRowTile + r;
    if (j < s.ee) {
      const int e = a.lists[j];
      row = s.chunk_row0 + e / (f.heads_q * f.past);
      head = (e / f.past) % f.heads_q;
      pos = INT_MAX;  // a past block lies wholly before the row
    }
  }
  KvRow x{};
  if (row >= 0) {
    x.q = static_cast<int64_t>(row) * f.q_ts + static_cast<int64_t>(head) * f.q_hs;
    x.dout = static_cast<int64_t>(row) * a.do_ts + static_cast<int64_t>(head) * a.do_hs;
    x.lse2 = f.lse[static_cast<int64_t>(head) * f.lse_hs + static_cast<int64_t>(row) * f.lse_ts] *
             kAttnLog2e;
    x.delta = a.delta[static_cast<int64_t>(row) * f.heads_q + head];
    x.pos = pos;
    x.dq = (row - s.chunk_row0) * f.heads_q + head;
  } else {
    x.q = x.dout = -1;
    x.lse2 = x.delta = 0.0f;
    x.pos = -1;
    x.dq = -1;
  }
  return x;
}

// Adds one key's dK and dV (this thread's columns 8 dt + 2 tq + j, read
// through dk(dt, j) / dv(dt, j)) to the fp32 accumulators: one owner per
// (key, kv head) per launch, so a plain read-modify-write.
template <int D, class DK, class DV>
__device__ __forceinline__ void add_key_grads(const BwdArgs& a, int64_t key_row, int kvh, int tq,
                                              DK dk, DV dv) {
  const int64_t at = (key_row * a.heads_kv + kvh) * D + 2 * tq;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    float2* pk = reinterpret_cast<float2*>(a.dk_acc + at + dt * 8);
    float2* pv = reinterpret_cast<float2*>(a.dv_acc + at + dt * 8);
    float2 ok = *pk, ov = *pv;
    ok.x += dk(dt, 0);
    ok.y += dk(dt, 1);
    ov.x += dv(dt, 0);
    ov.y += dv(dt, 1);
    *pk = ok;
    *pv = ov;
  }
}

}  // namespace moba::backends::cuda::detail
