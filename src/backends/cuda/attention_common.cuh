// Device code shared by the two attention kernels of the CUDA forward: the
// mma.sync kernel (attention.cu) and the Hopper wgmma kernel
// (attention_sm90.cu): the tile record, past-tile decoding, the key-step
// walk, the online softmax and the epilogue. Only the fragment layouts of S
// and O and the key step differ, so the helpers take the step as a template
// argument and reach a thread's accumulators through accessors; everything
// is force-inlined, and the generated code is that of the former copies
// (same PTX up to operand order, same ptxas register and spill counts).
// Two pieces stay in each kernel on purpose, as shared helpers changed the
// mma.sync kernel's code: the score mask (a bool helper turned its branches
// into selects) and the row-tile decoding of current / dense (its register
// count went from 250 to 254 at head dim 64).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "backends/cuda/kernels.cuh"

namespace moba::backends::cuda::detail {

inline constexpr float kAttnLog2e = 1.4426950408889634f;
inline constexpr float kAttnLn2 = 0.6931471805599453f;

// What a tile attends to, in positions within its sequence.
struct AttnTile {
  int64_t key_row0;  // packed k row of position 0 of the sequence
  int kvh;
  int lo, hi;               // keys [lo, hi)
  int first_pos, last_pos;  // positions of the first / last query row (current, dense)
  int rows;                 // valid rows
  int64_t row0;             // packed query row of tile row 0 (current, dense)
  int head;                 // query head (current, dense)
  int entry0;               // first entry of the descriptor (past)
};

// Past mode: the tile of descriptor {bucket, first entry, entries, 0}, keys
// = the whole past block of the bucket.
__device__ __forceinline__ void decode_past_tile(const AttnArgs& a, const int4 desc, AttnTile& tk) {
  const SeqTable& st = a.seq;
  tk.kvh = static_cast<int>(desc.x / a.blocks_bound);
  const int gb = static_cast<int>(desc.x - tk.kvh * a.blocks_bound);
  const int b = upper_index(st.block_begin, st.batch + 1, gb);
  const int len_k = st.k_begin[b + 1] - st.k_begin[b];
  tk.key_row0 = st.k_begin[b];
  tk.lo = (gb - st.block_begin[b]) * a.block_size;
  tk.hi = min(tk.lo + a.block_size, len_k);
  tk.rows = desc.z;
  tk.entry0 = desc.y;
}

// Element offset of the q vector of past entry e (entry = flat index into
// the chunk's [row][head][past] selection).
__device__ __forceinline__ int64_t past_q_offset(const AttnArgs& a, int e, int64_t chunk_row0) {
  const int local = e / (a.heads_q * a.past);
  const int head = (e / a.past) % a.heads_q;
  return (chunk_row0 + local) * a.q_ts + static_cast<int64_t>(head) * a.q_hs;
}

// The first key of the tile's first kKeys-key step, or -1.
__device__ __forceinline__ int first_key_step(const AttnTile& tk) {
  return tk.lo < tk.hi ? tk.lo : -1;
}

// The first key of the next kKeys-key step after the one at t0 that some
// row of the tile needs, or -1. In current mode the steps that lie wholly
// before every remaining row's block start are skipped (tiny blocks would
// otherwise scan the tile's whole span).
template <AttnMode kMode, int kKeys>
__device__ __forceinline__ int next_key_step(const AttnTile& tk, int t0, int block_size) {
  int t = t0 + kKeys;
  if (t >= tk.hi) return -1;
  if constexpr (kMode == AttnMode::current) {
    const int p = max(tk.first_pos, t);  // the first row that still needs keys >= t
    if (p > tk.last_pos) return -1;
    t = max(t, (p / block_size) * block_size);
  }
  return t;
}

// Whether some key of the step at t0 is masked for some row of the tile.
template <AttnMode kMode, int kKeys>
__device__ __forceinline__ bool key_step_needs_mask(const AttnTile& tk, int t0, int block_size) {
  if constexpr (kMode == AttnMode::past) {
    return t0 + kKeys > tk.hi;
  } else if constexpr (kMode == AttnMode::current) {
    return t0 < (tk.last_pos / block_size) * block_size || t0 + kKeys - 1 > tk.first_pos;
  } else {
    return t0 + kKeys - 1 > tk.first_pos;
  }
}

// One step of the online softmax for one accumulator row half of a thread
// (its quad holds the whole row): new row max over the step's kNT n8 score
// groups, rescale of the running sum and of the kDT n8 output groups,
// scores exponentiated in place (base 2). s(nt, j) and o(dt, j) return
// element j (0, 1) of the thread's pair in score / output group nt / dt.
template <int kNT, int kDT, class Scores, class Out>
__device__ __forceinline__ void online_softmax_row(float& m, float& l, float scale_log2, Scores&& s,
                                                   Out&& o) {
  float mx = m;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s(nt, 0), s(nt, 1)));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float ref = mx == -INFINITY ? 0.0f : mx * scale_log2;
  const float alpha = fast_exp2(m * scale_log2 - ref);
  m = mx;
  float sum = 0.0f;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    s(nt, 0) = fast_exp2(fmaf(s(nt, 0), scale_log2, -ref));
    s(nt, 1) = fast_exp2(fmaf(s(nt, 1), scale_log2, -ref));
    sum += s(nt, 0) + s(nt, 1);
  }
  l = l * alpha + sum;
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    o(dt, 0) *= alpha;
    o(dt, 1) *= alpha;
  }
}

// The epilogue of one accumulator row half (tile row r, position pos): the
// quad's partial sums make the row sum; then past mode writes the
// normalized partial output (in the input dtype: the merge weighs it by its
// lse in fp32, and the final output is rounded to that dtype anyway; this
// halves the partials' traffic) and its lse at entry entries[entry0 + r]; current
// mode merges the row's partials by log-sum-exp and writes out and lse;
// dense mode writes out and lse. m is the row max in raw scores, l the
// thread's part of the row sum, o(dt, j) as in online_softmax_row. Every
// lane of the warp must call it (the row sum is a quad shuffle).
template <class T, int D, AttnMode kMode, class Out>
__device__ __forceinline__ void store_row(const AttnArgs& a, const AttnTile& tk, int r, int pos,
                                          const int32_t* entries, int entry0, float m, float l,
                                          float scale_log2, int block_size, int64_t chunk_row0,
                                          int tq, Out&& o) {
  constexpr int kDT = D / 8;
  float sum = l;
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if (r >= tk.rows) return;
  const float mref = m * scale_log2;  // row max in base-2 units of the scaled scores
  if constexpr (kMode == AttnMode::past) {
    const int64_t e = entries[entry0 + r];
    const float inv = 1.0f / sum;
    T* dst = static_cast<T*>(a.part_o) + e * D + 2 * tq;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(o(dt, 0) * inv, o(dt, 1) * inv);
    if (tq == 0) a.part_lse[e] = (mref + log2f(sum)) * kAttnLn2;
  } else {
    const int64_t row = tk.row0 + r;
    const int head = tk.head;
    float top = mref, total = sum;
    if constexpr (kMode == AttnMode::current) {
      const int count = min(a.past, pos / block_size);
      if (count > 0) {
        const int64_t base = ((row - chunk_row0) * a.heads_q + head) * a.past;
        for (int sl = 0; sl < count; ++sl) top = fmaxf(top, a.part_lse[base + sl] * kAttnLog2e);
        const float f = fast_exp2(mref - top);
        total *= f;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          o(dt, 0) *= f;
          o(dt, 1) *= f;
        }
        for (int sl = 0; sl < count; ++sl) {
          const float w = fast_exp2(a.part_lse[base + sl] * kAttnLog2e - top);
          total += w;
          const T* src = static_cast<const T*>(a.part_o) + (base + sl) * D + 2 * tq;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const float2 x = unpack2<T>(*reinterpret_cast<const uint32_t*>(src + dt * 8));
            o(dt, 0) = fmaf(w, x.x, o(dt, 0));
            o(dt, 1) = fmaf(w, x.y, o(dt, 1));
          }
        }
      }
    }
    const float inv = 1.0f / total;
    T* dst = static_cast<T*>(a.out) + row * a.o_ts + static_cast<int64_t>(head) * a.o_hs + 2 * tq;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(o(dt, 0) * inv, o(dt, 1) * inv);
    if (tq == 0 && a.lse != nullptr)
      a.lse[head * a.lse_hs + row * a.lse_ts] = (top + log2f(total)) * kAttnLn2;
  }
}

}  // namespace moba::backends::cuda::detail
