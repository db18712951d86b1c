// Valid inputs at the edges of the contract must be accepted, and give the
// same result whatever the layout of the tensors: empty batches and
// sequences, single tokens, blocks longer than the sequence, huge top-k,
// strided and packed views, aliasing inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <vector>

#include "support/testing.hpp"

namespace moba {
// Names the backend in test output instead of its bytes.
static void PrintTo(Backend backend, std::ostream* os) {
  *os << backend_name(backend);
}
}  // namespace moba

namespace moba::testing {
namespace {

// What forward, backward and routing write for one problem. Every output is
// poisoned first, so an element the library forgets to write shows up.
struct Results {
  Tensor out, lse, dq, dk, dv, selected;
};

constexpr int32_t kSelectedPoison = 0x5eed;

int64_t longest_sequence(const Tensor& cu_seqlens) {
  const auto* cu = static_cast<const int32_t*>(cu_seqlens.data());
  int64_t longest = 0;
  for (int64_t b = 0; b + 1 < cu_seqlens.numel(); ++b)
    longest = std::max<int64_t>(longest, cu[b + 1] - cu[b]);
  return longest;
}

TensorView strided_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                        std::initializer_list<int64_t> strides) {
  TensorView t = TensorView::contiguous(data, dtype, shape);
  std::copy(strides.begin(), strides.end(), t.strides.begin());
  return t;
}

class ValidEdges : public ::testing::TestWithParam<Backend> {
 protected:
  ExecOptions options() const {
    ExecOptions o;
    o.backend = GetParam();
    return o;
  }

  // Runs the three operations on `in` (whose shapes are those of w) and returns what they wrote.
  Results run_all(const Workload& w, const Inputs& in, const Config& cfg,
                  const Tensor& dout) const {
    const Case& c = w.c;
    Results r;
    r.out = Tensor(c.dtype, {w.total_q, c.heads_q, c.head_dim});
    r.lse = Tensor(DType::float32, {c.heads_q, w.total_q});
    r.dq = Tensor(c.dtype, {w.total_q, c.heads_q, c.head_dim});
    r.dk = Tensor(c.dtype, {w.total_k, c.heads_kv, c.head_dim});
    r.dv = Tensor(c.dtype, {w.total_k, c.heads_kv, c.head_dim});
    const int64_t width = std::max<int64_t>(1, routing_width(longest_sequence(w.cu_k), cfg));
    r.selected = Tensor(DType::int32, {w.total_q, c.heads_q, width});
    for (Tensor* t : {&r.out, &r.lse, &r.dq, &r.dk, &r.dv}) t->poison();
    std::fill_n(static_cast<int32_t*>(r.selected.data()), r.selected.numel(), kSelectedPoison);
    forward(in, cfg, r.out.view(), r.lse.view(), options());
    backward(in, cfg, r.out.view(), dout.view(), r.lse.view(), r.dq.view(), r.dk.view(),
             r.dv.view(), options());
    routing(in, cfg, r.selected.view(), options());
    return r;
  }

  Results run_all(const Workload& w) const {
    return run_all(w, w.inputs(), w.config(), random_dout(w));
  }

  static Tensor random_dout(const Workload& w) {
    Tensor dout = w.new_out();
    std::mt19937_64 rng(w.c.seed + 17);
    dout.randn(rng);
    return dout;
  }
};

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel() * dtype_size(a.dtype()))) ==
             0;
}

void expect_same_results(const Results& a, const Results& b) {
  EXPECT_TRUE(same_bytes(a.out, b.out)) << "out";
  EXPECT_TRUE(same_bytes(a.lse, b.lse)) << "lse";
  EXPECT_TRUE(same_bytes(a.dq, b.dq)) << "dq";
  EXPECT_TRUE(same_bytes(a.dk, b.dk)) << "dk";
  EXPECT_TRUE(same_bytes(a.dv, b.dv)) << "dv";
  EXPECT_TRUE(same_bytes(a.selected, b.selected)) << "selected";
}

// Forward against the independent dense causal attention (valid when every
// query may see its whole causal past: top_k >= blocks, or one block).
void expect_dense_causal(const Workload& w, const Results& r) {
  std::vector<double> out, lse;
  dense_causal_attention(w, out, lse);
  const double tol = output_tolerance(w.c.dtype);
  const ErrorStats o = compare(r.out.to_double(), out);
  const ErrorStats l = compare(r.lse.to_double(), lse);
  EXPECT_TRUE(o.finite && l.finite) << describe(w.c);
  EXPECT_LT(o.max_abs, tol) << describe(w.c);
  EXPECT_LT(l.max_abs, tol) << describe(w.c);
}

Case small_case(std::vector<int32_t> lens_q, std::vector<int32_t> lens_k = {}) {
  Case c;
  c.lens_q = std::move(lens_q);
  c.lens_k = std::move(lens_k);
  c.heads_q = 4;
  c.heads_kv = 2;
  c.head_dim = 8;
  c.block_size = 2;
  c.top_k = 2;
  c.seed = 11;
  return c;
}

TEST_P(ValidEdges, EmptyBatchIsAccepted) {
  // cu_seqlens [0]: no sequence; every tensor has no rows and no data.
  const Workload w = make_workload(small_case({}));
  ASSERT_EQ(w.cu_q.numel(), 1);
  ASSERT_EQ(w.q.view().data, nullptr);
  EXPECT_NO_THROW(run_all(w));
}

// routing_width() is documented as the smallest W routing() accepts; with no
// keys at all it is 0, so a [0, Hq, 0] selection must be accepted.
TEST_P(ValidEdges, EmptyBatchAcceptsTheAdvertisedRoutingWidth) {
  const Workload w = make_workload(small_case({}));
  const int64_t width = routing_width(0, w.config());
  ASSERT_EQ(width, 0);
  const TensorView selected =
      TensorView::contiguous(nullptr, DType::int32, {0, w.c.heads_q, width});
  EXPECT_NO_THROW(routing(w.inputs(), w.config(), selected, options()));
}

TEST_P(ValidEdges, AllSequencesEmptyIsAccepted) {
  const Workload w = make_workload(small_case({0, 0, 0}));
  ASSERT_EQ(w.total_q, 0);
  EXPECT_NO_THROW(run_all(w));
}

// Decode with nothing to decode yet: keys but no queries. The gradients of
// k and v are overwritten with zeros.
TEST_P(ValidEdges, NoQueriesButKeysGivesZeroKeyGradients) {
  const Workload w = make_workload(small_case({0, 0}, {5, 2}));
  ASSERT_EQ(w.total_q, 0);
  const Results r = run_all(w);
  for (const Tensor* g : {&r.dk, &r.dv})
    for (double x : g->to_double()) ASSERT_EQ(x, 0.0);
}

// One query, one key: the softmax has a single term of weight 1.
TEST_P(ValidEdges, SingleTokenCopiesItsValueRow) {
  const Workload w = make_workload(small_case({1}));
  const Results r = run_all(w);
  const Case& c = w.c;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const Tensor dout = random_dout(w);
  for (int64_t h = 0; h < c.heads_q; ++h) {
    const int64_t kvh = h / (c.heads_q / c.heads_kv);
    double dot = 0.0;
    for (int64_t x = 0; x < c.head_dim; ++x) {
      EXPECT_NEAR(r.out.get(h * c.head_dim + x), w.v.get(kvh * c.head_dim + x), 1e-6);
      dot += static_cast<double>(w.q.get(h * c.head_dim + x)) * w.k.get(kvh * c.head_dim + x);
      // d softmax / d logits vanishes for a single key: dq = 0.
      EXPECT_NEAR(r.dq.get(h * c.head_dim + x), 0.0, 1e-6);
    }
    EXPECT_NEAR(r.lse.get(h), scale * dot, 1e-5);
  }
  for (int64_t kvh = 0; kvh < c.heads_kv; ++kvh)
    for (int64_t x = 0; x < c.head_dim; ++x) {
      double dv = 0.0;  // every query head of the group adds its dout
      for (int64_t g = 0; g < c.heads_q / c.heads_kv; ++g)
        dv += dout.get((kvh * (c.heads_q / c.heads_kv) + g) * c.head_dim + x);
      EXPECT_NEAR(r.dv.get(kvh * c.head_dim + x), dv, 1e-5);
      EXPECT_NEAR(r.dk.get(kvh * c.head_dim + x), 0.0, 1e-6);
    }
  ASSERT_EQ(r.selected.shape()[2], 1);
  for (int64_t h = 0; h < c.heads_q; ++h)
    EXPECT_EQ(static_cast<const int32_t*>(r.selected.data())[h], 0);
}

// A block longer than every sequence makes one block per sequence: full
// causal attention, whatever top_k.
class BlockLongerThanSequence : public ValidEdges {
 protected:
  void check(int64_t block_size) const {
    Case c = small_case({7, 3, 0}, {9, 3, 0});
    c.block_size = block_size;
    c.top_k = 1;
    const Workload w = make_workload(c);
    const Results r = run_all(w);
    expect_dense_causal(w, r);
    const auto* sel = static_cast<const int32_t*>(r.selected.data());
    ASSERT_EQ(r.selected.shape()[2], 1);
    for (int64_t i = 0; i < r.selected.numel(); ++i) ASSERT_EQ(sel[i], 0) << "entry " << i;
  }
};

TEST_P(BlockLongerThanSequence, ModerateBlockSizes) {
  for (int64_t b : {int64_t{9}, int64_t{1000}, int64_t{1} << 40}) {
    SCOPED_TRACE(b);
    check(b);
  }
}

// block_size is any int64 >= 1: the largest must not overflow the block
// count (ceil(len / block_size) computed as (len + block_size - 1) / block_size
// does).
TEST_P(BlockLongerThanSequence, Int64MaxBlockSize) {
  check(std::numeric_limits<int64_t>::max());
}

TEST_P(ValidEdges, HugeTopKIsDenseCausalAndSelectsEveryCausalBlock) {
  Case c = small_case({37, 2}, {37, 9});
  c.block_size = 4;
  c.top_k = std::numeric_limits<int64_t>::max();
  const Workload w = make_workload(c);
  const Results r = run_all(w);
  expect_dense_causal(w, r);

  // Query i of a sequence sits at position len_k - len_q + i and selects
  // blocks 0 .. its own, then -1 padding.
  const int64_t width = r.selected.shape()[2];
  ASSERT_EQ(width, 10);  // ceil(37 / 4)
  const auto* sel = static_cast<const int32_t*>(r.selected.data());
  int64_t row = 0;
  for (size_t b = 0; b < c.lens_q.size(); ++b)
    for (int64_t i = 0; i < c.lens_q[b]; ++i, ++row) {
      const int64_t current = (c.lens_k[b] - c.lens_q[b] + i) / c.block_size;
      for (int64_t h = 0; h < c.heads_q; ++h)
        for (int64_t j = 0; j < width; ++j)
          ASSERT_EQ(sel[(row * c.heads_q + h) * width + j], j <= current ? j : -1)
              << "row " << row << " head " << h << " slot " << j;
    }

  // Any top_k at least the number of blocks gives the same bytes.
  c.top_k = 10;
  Workload exact = make_workload(c);
  Results r10 = run_all(exact);
  expect_same_results(r, r10);
}

// q, k, v as views of one packed [total, Hq + 2 Hkv, D] buffer (token stride
// (Hq + 2 Hkv) * D), as a fused qkv projection produces them.
TEST_P(ValidEdges, PackedQkvViewsMatchContiguousCopies) {
  for (DType dtype : {DType::float32, DType::bfloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    Case c = small_case({9, 0, 6});
    c.head_dim = 16;
    c.block_size = 4;
    c.dtype = dtype;
    const Workload w = make_workload(c);
    const int64_t hq = c.heads_q, hkv = c.heads_kv, d = c.head_dim, heads = hq + 2 * hkv;
    Tensor packed(dtype, {w.total_q, heads, d});
    for (int64_t t = 0; t < w.total_q; ++t)
      for (int64_t x = 0; x < d; ++x) {
        for (int64_t h = 0; h < hq; ++h)
          packed.set((t * heads + h) * d + x, w.q.get((t * hq + h) * d + x));
        for (int64_t h = 0; h < hkv; ++h) {
          packed.set((t * heads + hq + h) * d + x, w.k.get((t * hkv + h) * d + x));
          packed.set((t * heads + hq + hkv + h) * d + x, w.v.get((t * hkv + h) * d + x));
        }
      }
    Inputs in = w.inputs();
    char* base = static_cast<char*>(packed.data());
    const int64_t esize = dtype_size(dtype);
    in.q = strided_view(base, dtype, {w.total_q, hq, d}, {heads * d, d, 1});
    in.k = strided_view(base + hq * d * esize, dtype, {w.total_k, hkv, d}, {heads * d, d, 1});
    in.v =
        strided_view(base + (hq + hkv) * d * esize, dtype, {w.total_k, hkv, d}, {heads * d, d, 1});
    const Tensor dout = random_dout(w);
    expect_same_results(run_all(w, in, w.config(), dout), run_all(w, w.inputs(), w.config(), dout));
  }
}

// q, k, v stored heads-major ([H, total, D]) and viewed as [total, H, D].
TEST_P(ValidEdges, HeadsMajorViewsMatchContiguousCopies) {
  const Workload w = make_workload(small_case({5, 4}, {7, 4}));
  const Case& c = w.c;
  const auto heads_major = [](const Tensor& src, int64_t total, int64_t heads, int64_t d) {
    Tensor t(src.dtype(), {heads, total, d});
    for (int64_t r = 0; r < total; ++r)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t x = 0; x < d; ++x)
          t.set((h * total + r) * d + x, src.get((r * heads + h) * d + x));
    return t;
  };
  Tensor q = heads_major(w.q, w.total_q, c.heads_q, c.head_dim);
  Tensor k = heads_major(w.k, w.total_k, c.heads_kv, c.head_dim);
  Tensor v = heads_major(w.v, w.total_k, c.heads_kv, c.head_dim);
  Inputs in = w.inputs();
  in.q = strided_view(q.data(), c.dtype, {w.total_q, c.heads_q, c.head_dim},
                      {c.head_dim, w.total_q * c.head_dim, 1});
  in.k = strided_view(k.data(), c.dtype, {w.total_k, c.heads_kv, c.head_dim},
                      {c.head_dim, w.total_k * c.head_dim, 1});
  in.v = strided_view(v.data(), c.dtype, {w.total_k, c.heads_kv, c.head_dim},
                      {c.head_dim, w.total_k * c.head_dim, 1});
  const Tensor dout = random_dout(w);
  expect_same_results(run_all(w, in, w.config(), dout), run_all(w, w.inputs(), w.config(), dout));
}

// Outputs with padded strides: the library writes exactly the viewed
// elements, leaving the padding alone, and the values of a contiguous call.
TEST_P(ValidEdges, StridedOutputsAreWrittenInPlace) {
  const Workload w = make_workload(small_case({6, 0, 3}));
  const Case& c = w.c;
  const int64_t tq = w.total_q, tk = w.total_k, hq = c.heads_q, hkv = c.heads_kv, d = c.head_dim;
  const Config cfg = w.config();
  const Tensor dout = random_dout(w);
  const Results expected = run_all(w, w.inputs(), cfg, dout);

  // Every output with padding after each token (out, dq, dk, dv: 5 elements;
  // selected: 2 slots) or after each head's row (lse: 3 entries).
  constexpr int64_t kPad = 5;
  const int64_t width = expected.selected.shape()[2];
  Tensor out(c.dtype, {tq, hq * d + kPad}), dq(c.dtype, {tq, hq * d + kPad});
  Tensor dk(c.dtype, {tk, hkv * d + kPad}), dv(c.dtype, {tk, hkv * d + kPad});
  Tensor lse(DType::float32, {hq, tq + 3}), sel(DType::int32, {tq, hq, width + 2});
  for (Tensor* t : {&out, &dq, &dk, &dv, &lse}) t->poison();
  std::fill_n(static_cast<int32_t*>(sel.data()), sel.numel(), kSelectedPoison);
  const auto padded = [&](Tensor& t, int64_t tokens, int64_t heads) {
    return strided_view(t.data(), c.dtype, {tokens, heads, d}, {heads * d + kPad, d, 1});
  };
  const TensorView out_v = padded(out, tq, hq), dq_v = padded(dq, tq, hq);
  const TensorView dk_v = padded(dk, tk, hkv), dv_v = padded(dv, tk, hkv);
  const TensorView lse_v = strided_view(lse.data(), DType::float32, {hq, tq}, {tq + 3, 1});
  const TensorView sel_v =
      strided_view(sel.data(), DType::int32, {tq, hq, width}, {hq * (width + 2), width + 2, 1});

  forward(w.inputs(), cfg, out_v, lse_v, options());
  backward(w.inputs(), cfg, out_v, dout.view(), lse_v, dq_v, dk_v, dv_v, options());
  routing(w.inputs(), cfg, sel_v, options());

  const auto bits = [](const Tensor& t, int64_t i) {  // compares the NaN poison too
    uint32_t b = 0;
    std::memcpy(&b, static_cast<const char*>(t.data()) + i * dtype_size(t.dtype()),
                static_cast<size_t>(dtype_size(t.dtype())));
    return b;
  };
  const uint32_t poison = dtype_size(c.dtype) == 4 ? 0xffffffffu : 0xffffu;  // Tensor::poison bytes
  // `padded_t` holds `tokens` rows of `row` values plus kPad of padding each.
  const auto expect_rows = [&](const Tensor& padded_t, const Tensor& contiguous, int64_t tokens,
                               int64_t row, const char* name) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t i = 0; i < row; ++i)
        ASSERT_EQ(bits(padded_t, t * (row + kPad) + i), bits(contiguous, t * row + i))
            << name << " token " << t;
      for (int64_t i = row; i < row + kPad; ++i)
        ASSERT_EQ(bits(padded_t, t * (row + kPad) + i), poison)
            << name << " padding of token " << t;
    }
  };
  expect_rows(out, expected.out, tq, hq * d, "out");
  expect_rows(dq, expected.dq, tq, hq * d, "dq");
  expect_rows(dk, expected.dk, tk, hkv * d, "dk");
  expect_rows(dv, expected.dv, tk, hkv * d, "dv");
  for (int64_t h = 0; h < hq; ++h) {
    for (int64_t t = 0; t < tq; ++t)
      ASSERT_EQ(bits(lse, h * (tq + 3) + t), bits(expected.lse, h * tq + t));
    for (int64_t t = tq; t < tq + 3; ++t)
      ASSERT_EQ(bits(lse, h * (tq + 3) + t), 0xffffffffu) << "lse padding";
  }
  const auto* got = static_cast<const int32_t*>(sel.data());
  const auto* want = static_cast<const int32_t*>(expected.selected.data());
  for (int64_t r = 0; r < tq * hq; ++r)
    for (int64_t j = 0; j < width + 2; ++j)
      ASSERT_EQ(got[r * (width + 2) + j], j < width ? want[r * width + j] : kSelectedPoison)
          << "selected " << r;
}

// cu_seqlens may be strided views too (e.g. a column of a larger int32 table).
TEST_P(ValidEdges, StridedCuSeqlensMatchContiguous) {
  const Workload w = make_workload(small_case({4, 0, 5}, {6, 2, 5}));
  Tensor table(DType::int32, {2 * w.cu_q.numel(), 2});
  auto* cells = static_cast<int32_t*>(table.data());
  std::fill_n(cells, table.numel(), -7);  // junk between the viewed entries
  for (int64_t i = 0; i < w.cu_q.numel(); ++i) {
    cells[4 * i] = static_cast<const int32_t*>(w.cu_q.data())[i];
    cells[4 * i + 1] = static_cast<const int32_t*>(w.cu_k.data())[i];
  }
  Inputs in = w.inputs();
  in.cu_seqlens_q = strided_view(cells, DType::int32, {w.cu_q.numel()}, {4});
  in.cu_seqlens_k = strided_view(cells + 1, DType::int32, {w.cu_k.numel()}, {4});
  const Tensor dout = random_dout(w);
  expect_same_results(run_all(w, in, w.config(), dout), run_all(w, w.inputs(), w.config(), dout));
}

TEST_P(ValidEdges, SmallestAndLargestHeadDimsAreSupported) {
  for (int64_t d : {8, 256}) {
    Case c = small_case({3, 2});
    c.head_dim = d;
    c.top_k = 100;
    const Workload w = make_workload(c);
    expect_dense_causal(w, run_all(w));
  }
}

TEST_P(ValidEdges, ExactOrLooseMaxSeqlenBoundsChangeNothing) {
  const Workload w = make_workload(small_case({5, 2}, {5, 7}));
  const Tensor dout = random_dout(w);
  const Results computed = run_all(w, w.inputs(), w.config(), dout);
  for (int64_t extra : {0, 100}) {
    Inputs in = w.inputs();
    in.max_seqlen_q = 5 + extra;
    in.max_seqlen_k = 7 + extra;
    expect_same_results(run_all(w, in, w.config(), dout), computed);
  }
}

// lse is optional in forward: a default view or a view with null data.
TEST_P(ValidEdges, ForwardWithoutLseWritesTheSameOutput) {
  const Workload w = make_workload(small_case({6, 3}));
  Tensor with_lse = w.new_out(), lse = w.new_lse();
  forward(w.inputs(), w.config(), with_lse.view(), lse.view(), options());
  TensorView null_lse = lse.view();
  null_lse.data = nullptr;
  for (const TensorView& absent : {TensorView{}, null_lse}) {
    Tensor out = w.new_out();
    out.poison();
    forward(w.inputs(), w.config(), out.view(), absent, options());
    EXPECT_TRUE(same_bytes(out, with_lse));
  }
}

// The overlap check is by address range: an output right after an input in
// the same allocation does not overlap it.
TEST_P(ValidEdges, OutputAdjacentToInputInOneAllocationIsAccepted) {
  const Workload w = make_workload(small_case({6, 3}));
  Tensor both(DType::float32, {2 * w.q.numel()});
  std::memcpy(both.data(), w.q.data(), static_cast<size_t>(4 * w.q.numel()));
  Inputs in = w.inputs();
  in.q.data = both.data();
  const TensorView out =
      TensorView::contiguous(static_cast<float*>(both.data()) + w.q.numel(), DType::float32,
                             {w.total_q, w.c.heads_q, w.c.head_dim});
  ASSERT_NO_THROW(forward(in, w.config(), out, TensorView{}, options()));
  Tensor expected = w.new_out();
  forward(w.inputs(), w.config(), expected.view(), TensorView{}, options());
  EXPECT_EQ(std::memcmp(out.data, expected.data(), static_cast<size_t>(4 * w.q.numel())), 0);
}

// Inputs are only read, so they may share memory: k and v one tensor, and
// (with as many q heads as kv heads) q the same tensor too.
TEST_P(ValidEdges, InputsMayAliasEachOther) {
  Case c = small_case({6, 3});
  c.heads_q = c.heads_kv = 2;
  const Workload w = make_workload(c);
  Workload same = make_workload(c);
  std::memcpy(same.k.data(), w.q.data(), static_cast<size_t>(4 * w.q.numel()));
  std::memcpy(same.v.data(), w.q.data(), static_cast<size_t>(4 * w.q.numel()));
  Inputs aliased = w.inputs();
  aliased.k = aliased.v = aliased.q;
  const Tensor dout = random_dout(w);
  expect_same_results(run_all(w, aliased, w.config(), dout),
                      run_all(same, same.inputs(), same.config(), dout));
}

// Gradients are overwritten, not accumulated: keys no query attends to get
// exactly zero. The single query (position 19, block 4, top-k 1) attends only
// to keys 16..19.
TEST_P(ValidEdges, KeysNobodyAttendsToGetZeroGradients) {
  Case c = small_case({1}, {20});
  c.block_size = 4;
  c.top_k = 1;
  const Workload w = make_workload(c);
  const Results r = run_all(w);
  const int64_t row = c.heads_kv * c.head_dim;
  for (int64_t i = 0; i < 16 * row; ++i) {
    ASSERT_EQ(r.dk.get(i), 0.0f) << "dk element " << i;
    ASSERT_EQ(r.dv.get(i), 0.0f) << "dv element " << i;
  }
  bool any_nonzero = false;
  for (int64_t i = 16 * row; i < 20 * row; ++i) any_nonzero |= r.dv.get(i) != 0.0f;
  EXPECT_TRUE(any_nonzero);
}

std::string backend_label(const ::testing::TestParamInfo<Backend>& info) {
  return backend_name(info.param);
}

INSTANTIATE_TEST_SUITE_P(Host, ValidEdges, ::testing::Values(Backend::reference, Backend::cpu),
                         backend_label);
INSTANTIATE_TEST_SUITE_P(Host, BlockLongerThanSequence,
                         ::testing::Values(Backend::reference, Backend::cpu), backend_label);

}  // namespace
}  // namespace moba::testing
