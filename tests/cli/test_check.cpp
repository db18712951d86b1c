// `moba check`'s judgement: identical results pass, errors beyond tolerance
// and wrong selections fail, and a selection that differs only between
// exactly tied blocks is accepted as a near tie.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "check.hpp"
#include "workload.hpp"

namespace moba::cli {
namespace {

CheckCase small_case(DType dtype) {
  CheckCase c;
  c.lens_q = {48, 20};
  c.heads_q = 4;
  c.heads_kv = 2;
  c.head_dim = 64;
  c.block_size = 8;
  c.top_k = 3;
  c.dtype = dtype;
  return c;
}

Workload workload_of(const CheckCase& c, uint64_t seed) {
  return generate_workload(c.lens_q, c.lens_k, c.heads_q, c.heads_kv, c.head_dim, c.dtype, seed, 1);
}

TEST(Check, SweepCoversTheEdgeCasesAndIsDeterministic) {
  const auto cases = check_cases(builtin_case_count() + 6, 5);
  std::set<DType> dtypes;
  std::set<int64_t> groups, dims;
  bool empty_seq = false, single = false, partial = false, top1 = false, dense = false,
       decode = false, shared = false;
  for (const auto& c : cases) {
    dtypes.insert(c.dtype);
    groups.insert(c.heads_q / c.heads_kv);
    dims.insert(c.head_dim);
    for (int64_t l : c.lens_q) {
      empty_seq |= l == 0;
      single |= l == 1;
      partial |= l % c.block_size != 0;
      dense |= c.top_k >= (l + c.block_size - 1) / c.block_size && l > c.block_size;
    }
    top1 |= c.top_k == 1;
    decode |= !c.lens_k.empty();
    shared |= c.shared_routing;
  }
  EXPECT_EQ(dtypes.size(), 3u);
  EXPECT_TRUE(groups.count(1) && groups.count(4) && groups.count(8));
  EXPECT_TRUE(dims.count(64) && dims.count(128));
  EXPECT_TRUE(empty_seq && single && partial && top1 && dense && decode && shared);
  // The first five already span the dtypes: `moba check --cases 5` is meaningful.
  const auto five = check_cases(5, 0);
  EXPECT_EQ((std::set<DType>{five[0].dtype, five[1].dtype, five[2].dtype}).size(), 3u);
  // Random extras depend on the seed only.
  const auto again = check_cases(builtin_case_count() + 6, 5);
  for (size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(describe(cases[i]), describe(again[i]));
}

TEST(Check, IdenticalResultsPass) {
  for (DType dtype : {DType::float32, DType::bfloat16}) {
    const CheckCase c = small_case(dtype);
    const Workload w = workload_of(c, 1);
    Array dout(element_type(dtype), {w.total_q, c.heads_q, c.head_dim});
    fill_normal(dout, 1, 3, 1);
    const BackendResult a = run_backend(c, w, &dout, Backend::reference, 1);
    const BackendResult b = run_backend(c, w, &dout, Backend::reference, 1);
    const CaseReport r = judge(c, w, a, b);
    EXPECT_TRUE(r.ok());
    EXPECT_EQ(r.out.max_abs, 0.0);
    EXPECT_EQ(r.selection.agree, w.total_q * c.heads_q);
    EXPECT_EQ(r.selection.agreement(), 1.0);
    ASSERT_TRUE(r.dq && r.dk && r.dv);
    EXPECT_TRUE(r.dk->ok());
    EXPECT_EQ(r.out.compared, w.total_q * c.heads_q * c.head_dim);
  }
}

TEST(Check, ErrorsBeyondToleranceFail) {
  const CheckCase c = small_case(DType::float16);
  const Workload w = workload_of(c, 2);
  Array dout(ElementType::float16, {w.total_q, c.heads_q, c.head_dim});
  fill_normal(dout, 2, 3, 1);
  const BackendResult ref = run_backend(c, w, &dout, Backend::reference, 1);
  const double tol = tolerances(DType::float16).out;

  BackendResult slightly = ref;  // within tolerance: passes
  slightly.out.set(5, slightly.out.get(5) + 0.25 * tol);
  EXPECT_TRUE(judge(c, w, ref, slightly).ok());

  BackendResult off = ref;
  off.out.set(17, off.out.get(17) + 20 * tol);
  const CaseReport r = judge(c, w, ref, off);
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(r.out.ok());
  EXPECT_NEAR(r.out.max_abs, 20 * tol, 2e-3);

  BackendResult bad_lse = ref;
  bad_lse.lse[3] += 0.01f;
  EXPECT_FALSE(judge(c, w, ref, bad_lse).lse.ok());

  BackendResult nan = ref;
  nan.dv->set(0, std::nan(""));
  const CaseReport rn = judge(c, w, ref, nan);
  EXPECT_FALSE(rn.ok());
  EXPECT_FALSE(rn.dv->finite);
}

TEST(Check, WrongSelectionIsAMismatch) {
  const CheckCase c = small_case(DType::float32);
  const Workload w = workload_of(c, 3);
  const BackendResult ref = run_backend(c, w, nullptr, Backend::reference, 1);
  // Query row 40 (position 40, current block 5) selected 3 blocks; swap a past one
  // for a block it left out. With random scores that is no tie.
  const int64_t row = 40, head = 1;
  BackendResult cand = ref;
  int32_t* sel = cand.selected.data() + (row * c.heads_q + head) * cand.width;
  ASSERT_EQ(sel[2], 5);
  std::set<int32_t> chosen(sel, sel + 2);
  int32_t other = 0;
  while (chosen.count(other)) ++other;
  sel[0] = other;
  std::sort(sel, sel + 2);
  const CaseReport r = judge(c, w, ref, cand);
  EXPECT_EQ(r.selection.mismatches, 1);
  EXPECT_FALSE(r.ok());

  BackendResult future = ref;  // a block after the query's own is never valid
  future.selected[static_cast<size_t>((row * c.heads_q + head) * cand.width + 2)] = 6;
  EXPECT_EQ(judge(c, w, ref, future).selection.mismatches, 1);
}

TEST(Check, DifferentChoiceAmongTiedBlocksIsANearTie) {
  CheckCase c;
  c.lens_q = {48};
  c.heads_q = 1;
  c.heads_kv = 1;
  c.head_dim = 64;
  c.block_size = 16;
  c.top_k = 2;
  Workload w = workload_of(c, 4);
  // Blocks 0 and 1 get identical keys, so their scores tie exactly for every
  // query; the reference picks the lower index.
  std::copy(w.k.bytes.begin(), w.k.bytes.begin() + 16 * 64 * 4, w.k.bytes.begin() + 16 * 64 * 4);
  const BackendResult ref = run_backend(c, w, nullptr, Backend::reference, 1);
  const int64_t row = 40;  // block 2: chooses between the tied 0 and 1
  ASSERT_EQ(ref.selected[static_cast<size_t>(row * ref.width)], 0);
  BackendResult cand = ref;
  cand.selected[static_cast<size_t>(row * ref.width)] = 1;
  cand.out.set(row * 64, 100.0);  // that row's output is not compared
  const CaseReport r = judge(c, w, ref, cand);
  EXPECT_EQ(r.selection.near_ties, 1);
  EXPECT_EQ(r.selection.mismatches, 0);
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.out.compared, (w.total_q - 1) * 64);
}

}  // namespace
}  // namespace moba::cli
