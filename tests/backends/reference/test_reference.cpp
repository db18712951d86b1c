#include <gtest/gtest.h>

#include "support/testing.hpp"

namespace moba::testing {
namespace {

TEST(Reference, FullTopKEqualsDenseCausal) {
  Case c;
  c.lens_q = {37, 0, 1, 64};
  c.heads_q = 4;
  c.heads_kv = 1;
  c.head_dim = 16;
  c.block_size = 8;
  c.top_k = 100;
  Workload w = make_workload(c);
  Tensor out = w.new_out(), lse = w.new_lse();
  ExecOptions opt;
  opt.backend = Backend::reference;
  forward(w.inputs(), w.config(), out.view(), lse.view(), opt);
  std::vector<double> dense_out, dense_lse;
  dense_causal_attention(w, dense_out, dense_lse);
  EXPECT_LT(compare(out.to_double(), dense_out).max_abs, 1e-5);
  EXPECT_LT(compare(lse.to_double(), dense_lse).max_abs, 1e-5);
}

}  // namespace
}  // namespace moba::testing
