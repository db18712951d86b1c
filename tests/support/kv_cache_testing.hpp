// The KV-cache test fixture shared by the CPU decode tests and the CUDA
// decode tests: a test shape, and a host cache (contiguous, or paged from a
// shuffled pool with spare pages) together with the full keys and values
// that the test's appends feed it, so every test can recompute what the
// cache must hold; and the error-message helpers of their refusal tests.
// Header-only; link moba_test_support for Tensor.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moba/kv_cache.hpp"
#include "support/testing.hpp"

namespace moba::testing {

struct CacheShape {
  std::vector<int32_t> lens;  // final length of every sequence
  int64_t heads_q = 4, heads_kv = 1, head_dim = 64, block_size = 8, top_k = 3;
  DType dtype = DType::float32;
  bool shared = false;
  int64_t page_size = 0;  // 0: contiguous layout
  uint64_t seed = 1;
};

inline std::string describe(const CacheShape& s) {
  std::string lens;
  for (int32_t l : s.lens) lens += std::to_string(l) + ",";
  return "lens=" + lens + " Hq=" + std::to_string(s.heads_q) +
         " Hkv=" + std::to_string(s.heads_kv) + " D=" + std::to_string(s.head_dim) +
         " B=" + std::to_string(s.block_size) + " K=" + std::to_string(s.top_k) + " " +
         dtype_name(s.dtype) + (s.shared ? " shared" : "") +
         " page=" + std::to_string(s.page_size) + " seed=" + std::to_string(s.seed);
}

// Runs fn, which must throw moba::Error with status `expected`; returns the
// message (empty, with a failure recorded, when nothing was thrown).
template <class Fn>
std::string error_of(Fn&& fn, Status expected = Status::invalid_argument) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), expected) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}

inline void expect_contains(const std::string& message, const std::string& part) {
  EXPECT_NE(message.find(part), std::string::npos) << message << "\n  lacks: " << part;
}

inline int32_t* ints(Tensor& t) {
  return static_cast<int32_t*>(t.data());
}
inline const int32_t* ints(const Tensor& t) {
  return static_cast<const int32_t*>(t.data());
}

// Keys and values of every sequence's cached tokens, packed, with
// cu_seqlens_k and the longest cached length: moba::forward's view of a
// cache.
struct CachePrefix {
  Tensor k, v, cu_k;
  int64_t max_len = 0;
};

// The host cache memory of one test and the full keys / values it will
// receive. Shape is CacheShape or a test's extension of it (kept as `s`).
// The cache starts empty, its K/V and block sums poisoned: appends must
// write every row and initialize every block they touch.
template <class Shape>
struct CacheFixture {
  Shape s;
  std::mt19937_64 rng;
  int64_t batch = 0, capacity = 0;
  int64_t max_pages = 0, num_pages = 0;  // paged layout: page-table width, page pool
  int64_t max_blocks = 0;                // blocks of the capacity
  Tensor k_all, v_all;                   // per sequence, packed: [sum of lens, Hkv, D]
  std::vector<int64_t> start;            // first row of every sequence in k_all / v_all
  Tensor k, v, page_table, seqlens, sums;
  KVCache cache;  // views of the tensors above

  explicit CacheFixture(const Shape& shape) : s(shape), rng(shape.seed) {
    batch = static_cast<int64_t>(s.lens.size());
    start.assign(1, 0);
    for (int32_t l : s.lens) start.push_back(start.back() + l);
    k_all = Tensor(s.dtype, {start.back(), s.heads_kv, s.head_dim});
    v_all = Tensor(s.dtype, {start.back(), s.heads_kv, s.head_dim});
    k_all.randn(rng);
    v_all.randn(rng);
    const int64_t longest = *std::max_element(s.lens.begin(), s.lens.end());
    if (s.page_size == 0) {
      capacity = longest + 5;  // spare room: capacity is not a length
      k = Tensor(s.dtype, {batch, capacity, s.heads_kv, s.head_dim});
    } else {
      // Pages of every sequence drawn from one shuffled pool with spare pages;
      // entries past a sequence's final length stay -1 (never read).
      max_pages = (longest + s.page_size - 1) / s.page_size + 1;
      capacity = max_pages * s.page_size;
      int64_t needed = 0;
      for (int32_t l : s.lens) needed += (l + s.page_size - 1) / s.page_size;
      num_pages = needed + 3;
      std::vector<int32_t> order(static_cast<size_t>(num_pages));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      page_table = Tensor(DType::int32, {batch, max_pages});
      std::fill_n(ints(page_table), batch * max_pages, -1);
      size_t next = 0;
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t p = 0; p * s.page_size < s.lens[static_cast<size_t>(b)]; ++p)
          ints(page_table)[b * max_pages + p] = order[next++];
      k = Tensor(s.dtype, {num_pages, s.page_size, s.heads_kv, s.head_dim});
    }
    v = Tensor(s.dtype, k.shape());
    k.poison();
    v.poison();
    seqlens = Tensor(DType::int32, {batch});
    std::fill_n(ints(seqlens), batch, 0);
    max_blocks = (capacity + s.block_size - 1) / s.block_size;
    sums = Tensor(DType::float32, {batch, max_blocks, s.heads_kv, s.head_dim});
    sums.poison();  // append must initialize each block itself
    cache.k = k.view();
    cache.v = v.view();
    if (s.page_size != 0) cache.page_table = page_table.view();
    cache.seqlens = seqlens.view();
    cache.block_sums = sums.view();
    cache.block_size = s.block_size;
  }

  int64_t length(int64_t b) const { return ints(seqlens)[b]; }

  Config config() const {
    Config c;
    c.block_size = s.block_size;
    c.top_k = s.top_k;
    c.gqa_shared_routing = s.shared;
    return c;
  }

  // The keys and values of the next counts[b] tokens of every sequence (the
  // ones after its cached length), packed: [sum of counts, Hkv, D] each.
  void next_rows(const std::vector<int64_t>& counts, Tensor& kn, Tensor& vn) const {
    const int64_t row = s.heads_kv * s.head_dim;
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    kn = Tensor(s.dtype, {total, s.heads_kv, s.head_dim});
    vn = Tensor(s.dtype, {total, s.heads_kv, s.head_dim});
    int64_t at = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t from = start[static_cast<size_t>(b)] + length(b);
      for (int64_t i = 0; i < counts[static_cast<size_t>(b)] * row; ++i) {
        kn.set(at * row + i, k_all.get(from * row + i));
        vn.set(at * row + i, v_all.get(from * row + i));
      }
      at += counts[static_cast<size_t>(b)];
    }
  }

  // The first length(b) keys and values of every sequence: what the cache
  // holds now.
  CachePrefix prefix() const {
    CachePrefix p;
    const int64_t row = s.heads_kv * s.head_dim;
    int64_t total = 0;
    for (int64_t b = 0; b < batch; ++b) total += length(b);
    p.k = Tensor(s.dtype, {total, s.heads_kv, s.head_dim});
    p.v = Tensor(s.dtype, {total, s.heads_kv, s.head_dim});
    p.cu_k = Tensor(DType::int32, {batch + 1});
    ints(p.cu_k)[0] = 0;
    int64_t at = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t n = length(b), from = start[static_cast<size_t>(b)];
      for (int64_t i = 0; i < n * row; ++i) {
        p.k.set(at * row + i, k_all.get(from * row + i));
        p.v.set(at * row + i, v_all.get(from * row + i));
      }
      at += n;
      ints(p.cu_k)[b + 1] = static_cast<int32_t>(at);
      p.max_len = std::max(p.max_len, n);
    }
    return p;
  }
};

}  // namespace moba::testing
