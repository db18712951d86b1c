#include "sparsity.hpp"

#include <algorithm>
#include <vector>

namespace moba::cli {
namespace {

// Queries [q_first, q_first + len_q) of one sequence, routed against that
// sequence's keys [0, len_k): the queries are the last len_q positions.
struct Piece {
  int64_t q_row = 0;  // first query row in the packed q
  int64_t k_row = 0;  // first key row in the packed k
  int64_t len_q = 0;
  int64_t len_k = 0;
};

// Consecutive pieces whose q and k rows are contiguous, routed in one call.
struct Call {
  std::vector<Piece> pieces;
  int64_t rows_q = 0;
  int64_t rows_k = 0;
};

std::vector<Call> plan_calls(const Workload& w, int64_t max_rows) {
  std::vector<Call> calls;
  const auto add = [&](const Piece& piece) {
    if (!calls.empty()) {
      Call& last = calls.back();
      const Piece& prev = last.pieces.back();
      if (last.rows_q + piece.len_q <= max_rows && prev.q_row + prev.len_q == piece.q_row &&
          prev.k_row + prev.len_k == piece.k_row) {
        last.pieces.push_back(piece);
        last.rows_q += piece.len_q;
        last.rows_k += piece.len_k;
        return;
      }
    }
    calls.push_back(Call{{piece}, piece.len_q, piece.len_k});
  };
  for (int64_t b = 0; b < w.batch(); ++b) {
    const int64_t q0 = w.cu_q[b], len_q = w.cu_q[b + 1] - q0;
    const int64_t k0 = w.cu_k[b], len_k = w.cu_k[b + 1] - k0;
    if (len_q == 0) continue;
    const int64_t offset = len_k - len_q;  // position of the sequence's first query
    for (int64_t i = 0; i < len_q; i += max_rows) {
      const int64_t end = std::min(len_q, i + max_rows);
      add(Piece{q0 + i, k0, end - i, offset + end});
    }
  }
  return calls;
}

// A view of rows [first, first + rows) of a [tokens, heads, dim] tensor.
TensorView row_slice(const TensorView& t, int64_t first, int64_t rows) {
  TensorView s = t;
  s.shape[0] = rows;
  if (rows > 0)
    s.data = static_cast<char*>(t.data) + first * t.strides[0] * dtype_size(t.dtype);
  else
    s.data = nullptr;
  return s;
}

}  // namespace

Sparsity measure_sparsity(const Workload& w, const PlacedWorkload& placed, const Config& config,
                          const ExecOptions& options, int64_t max_chunk_bytes,
                          const std::function<void(int64_t, int64_t)>& on_chunk) {
  Sparsity result;
  const int64_t width = std::max<int64_t>(routing_width(w.max_len_k, config), 1);
  const int64_t row_bytes = w.heads_q * width * static_cast<int64_t>(sizeof(int32_t));
  const int64_t max_rows = std::max<int64_t>(1, max_chunk_bytes / row_bytes);
  const std::vector<Call> calls = plan_calls(w, max_rows);
  if (calls.empty()) return result;

  int64_t capacity = 0;
  for (const Call& c : calls) capacity = std::max(capacity, c.rows_q);
  const Device device = device_of(placed.placement);
  Buffer selected_buffer(placed.placement, static_cast<size_t>(capacity * row_bytes));
  Buffer cu_buffer(placed.placement, 2 * (w.cu_q.size() + 1) * sizeof(int32_t));
  std::vector<int32_t> selected(static_cast<size_t>(capacity * w.heads_q * width));

  for (size_t n = 0; n < calls.size(); ++n) {
    const Call& call = calls[n];
    if (on_chunk) on_chunk(static_cast<int64_t>(n), static_cast<int64_t>(calls.size()));
    const int64_t batch = static_cast<int64_t>(call.pieces.size());
    std::vector<int32_t> cu(static_cast<size_t>(2 * (batch + 1)), 0);  // cu_q then cu_k
    int64_t max_q = 0, max_k = 0;
    for (int64_t i = 0; i < batch; ++i) {
      const Piece& p = call.pieces[static_cast<size_t>(i)];
      cu[static_cast<size_t>(i + 1)] = cu[static_cast<size_t>(i)] + static_cast<int32_t>(p.len_q);
      cu[static_cast<size_t>(batch + 2 + i)] =
          cu[static_cast<size_t>(batch + 1 + i)] + static_cast<int32_t>(p.len_k);
      max_q = std::max(max_q, p.len_q);
      max_k = std::max(max_k, p.len_k);
    }
    cu_buffer.upload(cu.data(), cu.size() * sizeof(int32_t));
    Inputs in = placed.inputs;
    in.q = row_slice(placed.inputs.q, call.pieces.front().q_row, call.rows_q);
    in.k = row_slice(placed.inputs.k, call.pieces.front().k_row, call.rows_k);
    in.v = row_slice(placed.inputs.v, call.pieces.front().k_row, call.rows_k);
    auto* cu_device = static_cast<int32_t*>(cu_buffer.data());
    in.cu_seqlens_q = TensorView::contiguous(cu_device, DType::int32, {batch + 1}, device);
    in.cu_seqlens_k =
        TensorView::contiguous(cu_device + batch + 1, DType::int32, {batch + 1}, device);
    in.max_seqlen_q = max_q;
    in.max_seqlen_k = max_k;
    const TensorView sel = TensorView::contiguous(selected_buffer.data(), DType::int32,
                                                  {call.rows_q, w.heads_q, width}, device);
    routing(in, config, sel, options);
    selected_buffer.download(selected.data(), static_cast<size_t>(call.rows_q * row_bytes));
    ++result.calls;

    int64_t row = 0;
    for (const Piece& p : call.pieces) {
      for (int64_t i = 0; i < p.len_q; ++i, ++row) {
        const int64_t pos = p.len_k - p.len_q + i;
        const int64_t current = pos / config.block_size;
        for (int64_t h = 0; h < w.heads_q; ++h) {
          const int32_t* blocks = selected.data() + (row * w.heads_q + h) * width;
          int64_t previous = -1;
          for (int64_t m = 0; m < width && blocks[m] >= 0; ++m) {
            const int64_t j = blocks[m];
            if (j <= previous || j > current)
              throw Error(Status::internal,
                          "moba: routing returned block " + std::to_string(j) +
                              " for the query at position " + std::to_string(pos) + " (head " +
                              std::to_string(h) +
                              "); expected ascending blocks <= its current block " +
                              std::to_string(current));
            previous = j;
            const int64_t begin = j * config.block_size;
            result.attended += std::min({begin + config.block_size, p.len_k, pos + 1}) - begin;
          }
          result.causal += pos + 1;
        }
      }
    }
  }
  if (on_chunk) on_chunk(static_cast<int64_t>(calls.size()), static_cast<int64_t>(calls.size()));
  return result;
}

}  // namespace moba::cli
