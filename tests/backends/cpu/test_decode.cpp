// KV-cache decode on the CPU backend: a cache built by appending random
// chunks must hold exact block sums, and decoding from it must give what the
// prefill path (moba::forward with the queries at the last positions) gives
// on the same keys: the same routing and the same out / lse within tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

#include "moba/kv_cache.hpp"
#include "support/kv_cache_testing.hpp"
#include "support/testing.hpp"

namespace moba::testing {
namespace {

// The CPU backend's extra knob: its thread count.
struct Shape : CacheShape {
  int threads = 2;
};

// The cache of one test; appends go through the CPU backend.
struct Fixture : CacheFixture<Shape> {
  using CacheFixture::CacheFixture;

  ExecOptions options() const {
    ExecOptions o;
    o.num_threads = s.threads;
    return o;
  }

  // Appends the next `counts[b]` tokens of every sequence.
  void append(const std::vector<int64_t>& counts) {
    Tensor kn, vn;
    next_rows(counts, kn, vn);
    Tensor cu(DType::int32, {batch + 1});
    ints(cu)[0] = 0;
    int64_t at = 0;
    for (int64_t b = 0; b < batch; ++b) {
      at += counts[static_cast<size_t>(b)];
      ints(cu)[b + 1] = static_cast<int32_t>(at);
    }
    kv_cache_append(cache, kn.view(), vn.view(), cu.view(), options());
  }
};

bool close(double actual, double expected, DType dtype) {
  const double rtol = dtype == DType::float32 ? 2e-5 : dtype == DType::float16 ? 2e-3 : 1.6e-2;
  const double atol = dtype == DType::float32 ? 2e-5 : dtype == DType::float16 ? 2e-4 : 2e-3;
  return std::abs(actual - expected) <= atol + rtol * std::abs(expected);
}

// fp64 gate score of query row (token, head) for block j of sequence b, to
// judge whether two differing selections are a near tie (spec: noise only).
double gate_score(const Fixture& f, const Tensor& q, int64_t token, int64_t head, int64_t b,
                  int64_t j) {
  const int64_t d = f.s.head_dim, hkv = f.s.heads_kv, kvh = head / (f.s.heads_q / hkv);
  const int64_t begin = j * f.s.block_size;
  const int64_t end = std::min(begin + f.s.block_size, f.length(b));
  double score = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    double sum = 0.0;
    for (int64_t t = begin; t < end; ++t)
      sum += f.k_all.get(((f.start[static_cast<size_t>(b)] + t) * hkv + kvh) * d + c);
    score += q.get((token * f.s.heads_q + head) * d + c) * (sum / static_cast<double>(end - begin));
  }
  return score;
}

// Decodes `len_q[b]` queries per sequence from the cache and compares with
// the prefill path on the cache's current contents.
void check_decode(Fixture& f, const std::vector<int64_t>& len_q) {
  const Shape& s = f.s;
  const int64_t total_q = std::accumulate(len_q.begin(), len_q.end(), int64_t{0});
  Tensor q(s.dtype, {total_q, s.heads_q, s.head_dim});
  q.randn(f.rng);
  Tensor cu_q(DType::int32, {f.batch + 1});
  ints(cu_q)[0] = 0;
  for (int64_t b = 0; b < f.batch; ++b)
    ints(cu_q)[b + 1] = ints(cu_q)[b] + static_cast<int32_t>(len_q[static_cast<size_t>(b)]);

  Tensor out(s.dtype, {total_q, s.heads_q, s.head_dim}), lse(DType::float32, {s.heads_q, total_q});
  out.poison();
  lse.poison();
  kv_cache_decode(f.cache, q.view(), cu_q.view(), f.config(), out.view(), lse.view(), f.options());

  const CachePrefix p = f.prefix();
  Inputs in;
  in.q = q.view();
  in.k = p.k.view();
  in.v = p.v.view();
  in.cu_seqlens_q = cu_q.view();
  in.cu_seqlens_k = p.cu_k.view();
  Tensor ref_out(s.dtype, {total_q, s.heads_q, s.head_dim}),
      ref_lse(DType::float32, {s.heads_q, total_q});
  forward(in, f.config(), ref_out.view(), ref_lse.view());

  const int64_t width = std::max<int64_t>(1, routing_width(p.max_len, f.config()));
  Tensor sel(DType::int32, {total_q, s.heads_q, width}),
      ref_sel(DType::int32, {total_q, s.heads_q, width});
  kv_cache_routing(f.cache, q.view(), cu_q.view(), f.config(), sel.view(), f.options());
  routing(in, f.config(), ref_sel.view());

  int mismatches = 0;
  for (int64_t b = 0; b < f.batch; ++b)
    for (int64_t t = ints(cu_q)[b]; t < ints(cu_q)[b + 1]; ++t)
      for (int64_t h = 0; h < s.heads_q; ++h) {
        const int32_t* a = ints(sel) + (t * s.heads_q + h) * width;
        const int32_t* e = ints(ref_sel) + (t * s.heads_q + h) * width;
        if (!std::equal(a, a + width, e)) {
          // Allowed only as a near tie: every block it chose scores within
          // noise of the lowest-scoring block the prefill path chose.
          double lowest = INFINITY;
          for (int64_t m = 0; m < width && e[m] >= 0; ++m)
            lowest = std::min(lowest, gate_score(f, q, t, h, b, e[m]));
          for (int64_t m = 0; m < width && a[m] >= 0; ++m)
            EXPECT_NEAR(gate_score(f, q, t, h, b, a[m]), lowest, 1e-4 * (1 + std::abs(lowest)))
                << "routing differs beyond a near tie at token " << t << " head " << h;
          if (s.shared) continue;
          ++mismatches;
          continue;  // outputs legitimately differ for this row
        }
        for (int64_t c = 0; c < s.head_dim; ++c) {
          const int64_t i = (t * s.heads_q + h) * s.head_dim + c;
          if (!close(out.get(i), ref_out.get(i), s.dtype)) {
            ADD_FAILURE() << "out differs at token " << t << " head " << h << " dim " << c << ": "
                          << out.get(i) << " vs " << ref_out.get(i);
            return;
          }
        }
        const double l = lse.get(h * total_q + t), rl = ref_lse.get(h * total_q + t);
        EXPECT_NEAR(l, rl, 1e-4 * (1 + std::abs(rl))) << "lse at token " << t << " head " << h;
      }
  EXPECT_LE(mismatches, 2) << "too many near ties";
}

// The block sums against fp32 sums in token order recomputed from the keys.
void check_sums(const Fixture& f) {
  const Shape& s = f.s;
  const int64_t max_blocks = f.sums.shape()[1];
  for (int64_t b = 0; b < f.batch; ++b) {
    const int64_t len = f.length(b);
    for (int64_t j = 0; j * s.block_size < len; ++j)
      for (int64_t h = 0; h < s.heads_kv; ++h)
        for (int64_t c = 0; c < s.head_dim; ++c) {
          float sum = 0.0f;
          for (int64_t t = j * s.block_size; t < std::min(len, (j + 1) * s.block_size); ++t)
            sum += f.k_all.get(
                ((f.start[static_cast<size_t>(b)] + t) * s.heads_kv + h) * s.head_dim + c);
          const float got = f.sums.get(((b * max_blocks + j) * s.heads_kv + h) * s.head_dim + c);
          ASSERT_EQ(got, sum) << "block sum of sequence " << b << " block " << j << " head " << h;
        }
  }
}

// Builds the cache in random rounds; after each round decodes the tokens it
// added (chunked prefill, or decode when a round adds one token).
void run_rounds(const Shape& shape, bool single_tokens_at_end) {
  SCOPED_TRACE(describe(shape));
  Fixture f(shape);
  std::vector<int64_t> counts(static_cast<size_t>(f.batch));
  for (int round = 0; round < 40; ++round) {
    bool any = false;
    for (int64_t b = 0; b < f.batch; ++b) {
      const int64_t left = shape.lens[static_cast<size_t>(b)] - f.length(b);
      const int64_t cap = single_tokens_at_end && left <= 3 ? 1 : 1 + left / 2;
      const int64_t n =
          left == 0 ? 0 : std::uniform_int_distribution<int64_t>(0, std::min(left, cap))(f.rng);
      counts[static_cast<size_t>(b)] = n;
      any = any || left > 0;
    }
    if (!any) break;
    f.append(counts);
    check_decode(f, counts);
    if (::testing::Test::HasFailure()) return;
  }
  // Finish, then one decode query per non-empty sequence.
  for (int64_t b = 0; b < f.batch; ++b)
    counts[static_cast<size_t>(b)] = shape.lens[static_cast<size_t>(b)] - f.length(b);
  f.append(counts);
  check_sums(f);
  for (int64_t b = 0; b < f.batch; ++b) counts[static_cast<size_t>(b)] = f.length(b) > 0 ? 1 : 0;
  check_decode(f, counts);
}

TEST(Decode, RandomVarlenContiguousAndPaged) {
  std::mt19937_64 rng(2024);
  int cases = 0;
  for (DType dtype : {DType::float32, DType::float16, DType::bfloat16})
    for (int64_t page : {int64_t{0}, int64_t{4}}) {
      for (int rep = 0; rep < 2; ++rep) {
        Shape s;
        s.dtype = dtype;
        s.page_size = page;
        s.seed = rng();
        const int batch = std::uniform_int_distribution<int>(1, 4)(rng);
        for (int b = 0; b < batch; ++b)
          s.lens.push_back(std::uniform_int_distribution<int>(0, 6)(rng) == 0
                               ? 0
                               : std::uniform_int_distribution<int>(1, 120)(rng));
        const int64_t gqa[] = {1, 4, 8};
        s.heads_kv = std::uniform_int_distribution<int64_t>(1, 2)(rng);
        s.heads_q = s.heads_kv * gqa[std::uniform_int_distribution<int>(0, 2)(rng)];
        s.block_size = page == 0 ? std::uniform_int_distribution<int64_t>(1, 24)(rng)
                                 : page * std::uniform_int_distribution<int64_t>(1, 5)(rng);
        s.top_k = std::uniform_int_distribution<int64_t>(1, 5)(rng);
        s.shared = rng() % 3 == 0;
        s.threads = static_cast<int>(rng() % 4) + 1;
        run_rounds(s, rep == 1);
        ++cases;
        if (::testing::Test::HasFailure()) return;
      }
    }
  EXPECT_EQ(cases, 12);
}

TEST(Decode, EdgeShapes) {
  // Page size 1, block = page; top-k >= blocks (dense); block larger than
  // every sequence; GQA 8 with shared routing; head dim 128; split-K on one
  // long sequence with many threads.
  std::vector<Shape> shapes(6);
  shapes[0].lens = {37, 0, 9};
  shapes[0].page_size = 1;
  shapes[0].block_size = 1;
  shapes[0].top_k = 4;
  shapes[1].lens = {50, 17};
  shapes[1].top_k = 100;
  shapes[2].lens = {20, 3};
  shapes[2].block_size = 64;
  shapes[3].lens = {70};
  shapes[3].heads_q = 16;
  shapes[3].heads_kv = 2;
  shapes[3].shared = true;
  shapes[3].dtype = DType::bfloat16;
  shapes[4].lens = {45, 31};
  shapes[4].head_dim = 128;
  shapes[4].dtype = DType::float16;
  shapes[4].page_size = 8;
  shapes[4].block_size = 16;
  shapes[5].lens = {300};
  shapes[5].block_size = 4;
  shapes[5].top_k = 6;
  shapes[5].threads = 7;
  for (const Shape& s : shapes) {
    run_rounds(s, true);
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(Decode, RecycledSlotRestartsItsSums) {
  Shape s;
  s.lens = {30};
  Fixture f(s);
  f.append({30});
  // A new request in the same slot: only the length is reset.
  static_cast<int32_t*>(f.seqlens.data())[0] = 0;
  f.k_all.randn(f.rng);  // different keys, so a stale sum would show
  f.v_all.randn(f.rng);
  f.append({13});
  check_sums(f);
  check_decode(f, {2});
}

// ---- errors ----

struct ErrorFixture {
  Shape s;
  Fixture f;
  ErrorFixture() : f(shape()) {}
  static Shape shape() {
    Shape s;
    s.lens = {10, 6};
    s.page_size = 2;
    s.block_size = 4;
    return s;
  }
};

TEST(DecodeErrors, AppendValidation) {
  ErrorFixture e;
  Fixture& f = e.f;
  const int64_t hkv = f.s.heads_kv, d = f.s.head_dim;
  Tensor kn(f.s.dtype, {2, hkv, d}), vn(f.s.dtype, {2, hkv, d}), cu(DType::int32, {3});
  ints(cu)[0] = 0;
  ints(cu)[1] = 2;
  ints(cu)[2] = 2;
  // Capacity: 6 pages of 2 rows per sequence (max_pages = 6) = 12 tokens;
  // sequence 0 has pages 0..4 (10 tokens), its page 5 is -1.
  static_cast<int32_t*>(f.seqlens.data())[0] = 10;
  for (int i = 0; i < 5; ++i) ints(f.page_table)[i] = i;
  expect_contains(error_of([&] { kv_cache_append(f.cache, kn.view(), vn.view(), cu.view()); }),
                  "cache.page_table: entry [0, 5] = -1");
  ints(f.page_table)[5] = 1000;
  expect_contains(error_of([&] { kv_cache_append(f.cache, kn.view(), vn.view(), cu.view()); }),
                  "is not a page of the pool");
  ints(f.page_table)[5] = 1;
  static_cast<int32_t*>(f.seqlens.data())[0] = 11;
  expect_contains(error_of([&] { kv_cache_append(f.cache, kn.view(), vn.view(), cu.view()); }),
                  "exceed the capacity 12");
  static_cast<int32_t*>(f.seqlens.data())[0] = 13;
  expect_contains(error_of([&] { kv_cache_append(f.cache, kn.view(), vn.view(), cu.view()); }),
                  "cache.seqlens: entry 0 (13) outside [0, capacity = 12]");
  static_cast<int32_t*>(f.seqlens.data())[0] = 0;
  Tensor wrong_heads(f.s.dtype, {2, hkv + 1, d});
  expect_contains(
      error_of([&] { kv_cache_append(f.cache, wrong_heads.view(), vn.view(), cu.view()); }),
      "k_new: expected shape [tokens, 1, 64]");
  Tensor wrong_dtype(DType::float16, {2, hkv, d});
  expect_contains(
      error_of([&] { kv_cache_append(f.cache, kn.view(), wrong_dtype.view(), cu.view()); }),
      "v_new: expected dtype float32, got float16");
  ints(cu)[1] = 1;
  ints(cu)[2] = 1;
  expect_contains(error_of([&] { kv_cache_append(f.cache, kn.view(), vn.view(), cu.view()); }),
                  "cu_seqlens_new: last entry must equal the 2 rows");
  ints(cu)[1] = 2;
  ints(cu)[2] = 2;
  KVCache bad = f.cache;
  bad.block_size = 3;
  expect_contains(error_of([&] { kv_cache_append(bad, kn.view(), vn.view(), cu.view()); }),
                  "cache.block_size: 3 must be a multiple of the page size 2");
  bad = f.cache;
  bad.block_sums.shape[1] = 2;
  expect_contains(error_of([&] { kv_cache_append(bad, kn.view(), vn.view(), cu.view()); }),
                  "cache.block_sums: expected shape [2, >= 3, 1, 64]");
  bad = f.cache;
  bad.v = bad.k;
  expect_contains(error_of([&] { kv_cache_append(bad, kn.view(), vn.view(), cu.view()); }),
                  "cache.k: memory overlaps cache.v");
  bad = f.cache;
  bad.seqlens.dtype = DType::float32;
  expect_contains(error_of([&] { kv_cache_append(bad, kn.view(), vn.view(), cu.view()); }),
                  "cache.seqlens: expected dtype int32");
  bad = f.cache;
  bad.k.device = bad.v.device = Device{DeviceType::cuda, 0};
  if (backend_available(Backend::cuda))  // the cuda backend takes it and finds the host page table
    expect_contains(error_of([&] { kv_cache_append(bad, kn.view(), vn.view(), cu.view()); }),
                    "cache.page_table: on a different device than cache.k");
  else
    expect_contains(error_of([&] { kv_cache_append(bad, kn.view(), vn.view(), cu.view()); },
                             Status::backend_unavailable),
                    "kv_cache_append: ");
  // Nothing was written by the failed calls.
  EXPECT_EQ(f.length(0), 0);
  EXPECT_EQ(f.length(1), 0);
}

TEST(DecodeErrors, DecodeValidation) {
  ErrorFixture e;
  Fixture& f = e.f;
  f.append({10, 6});
  const int64_t hq = f.s.heads_q, d = f.s.head_dim;
  Tensor q(f.s.dtype, {3, hq, d}), out(f.s.dtype, {3, hq, d}), lse(DType::float32, {hq, 3});
  Tensor cu(DType::int32, {3});
  ints(cu)[0] = 0;
  ints(cu)[1] = 1;
  ints(cu)[2] = 3;
  const Config cfg = f.config();
  kv_cache_decode(f.cache, q.view(), cu.view(), cfg, out.view(), lse.view());  // valid
  Config other = cfg;
  other.block_size = 8;
  expect_contains(
      error_of([&] { kv_cache_decode(f.cache, q.view(), cu.view(), other, out.view(), {}); }),
      "block_size: 8 differs from cache.block_size 4");
  other = cfg;
  other.top_k = 0;
  expect_contains(
      error_of([&] { kv_cache_decode(f.cache, q.view(), cu.view(), other, out.view(), {}); }),
      "top_k: expected >= 1");
  {
    Shape two = ErrorFixture::shape();
    two.heads_kv = 2;
    Fixture g(two);
    Tensor q3(f.s.dtype, {3, 3, d}), out3(f.s.dtype, {3, 3, d});
    expect_contains(
        error_of([&] { kv_cache_decode(g.cache, q3.view(), cu.view(), cfg, out3.view(), {}); }),
        "q: heads (3) must be a positive multiple of the cache's kv heads (2)");
  }
  Tensor q_dim(f.s.dtype, {3, hq, 32});
  expect_contains(
      error_of([&] { kv_cache_decode(f.cache, q_dim.view(), cu.view(), cfg, out.view(), {}); }),
      "q: head dim 32 differs from the cache's 64");
  ints(cu)[1] = 3;
  ints(cu)[2] = 3;
  static_cast<int32_t*>(f.seqlens.data())[0] = 2;
  expect_contains(
      error_of([&] { kv_cache_decode(f.cache, q.view(), cu.view(), cfg, out.view(), {}); }),
      "cu_seqlens_q: sequence 0 has 3 queries but only 2 cached tokens");
  static_cast<int32_t*>(f.seqlens.data())[0] = 10;
  Tensor out_bad(f.s.dtype, {2, hq, d});
  expect_contains(
      error_of([&] { kv_cache_decode(f.cache, q.view(), cu.view(), cfg, out_bad.view(), {}); }),
      "out: expected shape [3, 4, 64]");
  Tensor lse_bad(DType::float32, {hq, 2});
  expect_contains(error_of([&] {
                    kv_cache_decode(f.cache, q.view(), cu.view(), cfg, out.view(), lse_bad.view());
                  }),
                  "lse: expected shape [4, 3]");
  expect_contains(
      error_of([&] { kv_cache_decode(f.cache, q.view(), cu.view(), cfg, q.view(), {}); }),
      "out: memory overlaps q");
  ExecOptions reference;
  reference.backend = Backend::reference;
  expect_contains(
      error_of(
          [&] { kv_cache_decode(f.cache, q.view(), cu.view(), cfg, out.view(), {}, reference); },
          Status::unsupported),
      "reference backend has no KV-cache path");
  Tensor sel(DType::int32, {3, hq, 1});
  expect_contains(
      error_of([&] { kv_cache_routing(f.cache, q.view(), cu.view(), cfg, sel.view()); }),
      "selected: expected shape [3, 4, W] with W >= 3");
}

}  // namespace
}  // namespace moba::testing
