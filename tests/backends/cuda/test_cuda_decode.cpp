// The CUDA KV-cache kernels (append, decode / chunked prefill, routing)
// against the CPU: one cache kept twice, on the host (cpu backend) and on the
// device (cuda backend), fed the same appends. After every append the device
// cache must hold the same K/V, lengths and bitwise-equal block sums; the
// CUDA routing must equal the CPU's (up to the spec's near ties) and the
// CUDA decode must equal moba::forward (cpu backend) on the cached keys
// within the per-dtype tolerance. Invalid device values must poison outputs
// (NaN / -1) or leave the cache untouched, never crash. Skipped without a GPU
// (except the test that a CUDA cache is refused there).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_testing.hpp"
#include "core/dtype.hpp"
#include "moba/kv_cache.hpp"
#include "support/kv_cache_testing.hpp"

namespace moba::testing {
namespace {

// The CUDA tests' default dtype is float16 (the kernels take no float32).
struct Shape : CacheShape {
  Shape() { dtype = DType::float16; }
};

Tensor int_tensor(const std::vector<int32_t>& v) {
  Tensor t(DType::int32, {static_cast<int64_t>(v.size())});
  std::copy(v.begin(), v.end(), ints(t));
  return t;
}

std::vector<int32_t> cu_of(const std::vector<int64_t>& counts) {
  std::vector<int32_t> cu(1, 0);
  for (int64_t n : counts) cu.push_back(cu.back() + static_cast<int32_t>(n));
  return cu;
}

// Downloads a device buffer into a new host tensor of the given shape.
Tensor fetch(const DeviceBuffer& b, DType dtype, std::vector<int64_t> shape) {
  Tensor t(dtype, std::move(shape));
  download(b, t);
  return t;
}

// One cache on the host (`cache`) and on the device (`dev`), fed the same
// appends.
class Twin : public CacheFixture<Shape> {
 public:
  explicit Twin(const Shape& shape) : CacheFixture(shape) {
    dk = upload(k);
    dv = upload(v);
    dseqlens = upload(seqlens);
    dsums = upload(sums);
    dev.k = on_device(k.view(), dk.get());
    dev.v = on_device(v.view(), dv.get());
    if (s.page_size != 0) {
      dtable = upload(page_table);
      dev.page_table = on_device(page_table.view(), dtable.get());
    }
    dev.seqlens = on_device(seqlens.view(), dseqlens.get());
    dev.block_sums = on_device(sums.view(), dsums.get());
    dev.block_size = s.block_size;
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~Twin() { (void)cudaStreamDestroy(stream); }
  Twin(const Twin&) = delete;
  Twin& operator=(const Twin&) = delete;

  ExecOptions cuda() const {
    ExecOptions o;
    o.backend = Backend::cuda;
    o.stream = stream;
    return o;
  }
  void sync() const { cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize"); }

  // Appends the next counts[b] tokens of every sequence to both caches.
  void append(const std::vector<int64_t>& counts) {
    Tensor kn, vn;
    next_rows(counts, kn, vn);
    const Tensor cu = int_tensor(cu_of(counts));
    const DeviceBuffer dkn = upload(kn), dvn = upload(vn), dcu = upload(cu);
    kv_cache_append(dev, on_device(kn.view(), dkn.get()), on_device(vn.view(), dvn.get()),
                    on_device(cu.view(), dcu.get()), cuda());
    kv_cache_append(cache, kn.view(), vn.view(), cu.view());
    sync();  // the new-row buffers are freed on return
  }

  // Row offset (elements) of token t of sequence b in the K/V buffers.
  int64_t row_offset(int64_t b, int64_t t) const {
    const int64_t row = s.heads_kv * s.head_dim;
    if (s.page_size == 0) return (b * capacity + t) * row;
    return (ints(page_table)[b * max_pages + t / s.page_size] * s.page_size + t % s.page_size) *
           row;
  }

  KVCache dev;
  DeviceBuffer dk, dv, dtable, dseqlens, dsums;
  cudaStream_t stream = nullptr;
};

// The device cache's lengths, K/V rows and block sums equal the host's
// (sums bitwise: the same fp32 additions in the same order).
void check_state(const Twin& f) {
  const Shape& s = f.s;
  const Tensor lens = fetch(f.dseqlens, DType::int32, {f.batch});
  for (int64_t b = 0; b < f.batch; ++b) ASSERT_EQ(ints(lens)[b], f.length(b)) << "seqlens " << b;
  const Tensor k = fetch(f.dk, s.dtype, f.k.shape()), v = fetch(f.dv, s.dtype, f.v.shape());
  const Tensor sums = fetch(f.dsums, DType::float32, f.sums.shape());
  const int64_t row = s.heads_kv * s.head_dim;
  for (int64_t b = 0; b < f.batch; ++b) {
    for (int64_t t = 0; t < f.length(b); ++t)
      for (int64_t i = 0; i < row; ++i) {
        const int64_t at = f.row_offset(b, t) + i;
        ASSERT_EQ(k.get(at), f.k.get(at)) << "k of sequence " << b << " token " << t;
        ASSERT_EQ(v.get(at), f.v.get(at)) << "v of sequence " << b << " token " << t;
      }
    for (int64_t j = 0; j * s.block_size < f.length(b); ++j)
      for (int64_t i = 0; i < row; ++i) {
        const int64_t at = (b * f.max_blocks + j) * row + i;
        ASSERT_EQ(sums.get(at), f.sums.get(at)) << "block sum of sequence " << b << " block " << j;
      }
  }
}

// fp64 gate score of (token, head) for block j of sequence b from the exact
// block mean rounded as the spec says, and the magnitude bounding its
// accumulation error (summed over the group when shared).
std::pair<double, double> gate_score(const Twin& f, const Tensor& q, int64_t token, int64_t head,
                                     int64_t b, int64_t j) {
  const Shape& s = f.s;
  const int64_t d = s.head_dim, hkv = s.heads_kv, group = s.heads_q / hkv, kvh = head / group;
  const int64_t begin = j * s.block_size, end = std::min(begin + s.block_size, f.length(b));
  const int64_t h0 = s.shared ? kvh * group : head, h1 = s.shared ? h0 + group : head + 1;
  double score = 0.0, mag = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    double sum = 0.0;
    for (int64_t t = begin; t < end; ++t)
      sum += f.k_all.get(((f.start[static_cast<size_t>(b)] + t) * hkv + kvh) * d + c);
    const double mean =
        core::round_to(s.dtype, static_cast<float>(sum / static_cast<double>(end - begin)));
    for (int64_t h = h0; h < h1; ++h) {
      const double x = q.get((token * s.heads_q + h) * d + c) * mean;
      score += x;
      mag += std::abs(x);
    }
  }
  return {score, mag};
}

// Decodes len_q[b] new queries per sequence on the device and compares the
// routing with the CPU cache's and the output with moba::forward (cpu).
void check_decode(Twin& f, const std::vector<int64_t>& len_q) {
  const Shape& s = f.s;
  const int64_t total_q = std::accumulate(len_q.begin(), len_q.end(), int64_t{0});
  if (total_q == 0) return;
  Tensor q(s.dtype, {total_q, s.heads_q, s.head_dim});
  q.randn(f.rng);
  const Tensor cu_q = int_tensor(cu_of(len_q));
  const DeviceBuffer dq = upload(q), dcu = upload(cu_q);
  const TensorView qd = on_device(q.view(), dq.get()), cud = on_device(cu_q.view(), dcu.get());

  Tensor out(s.dtype, {total_q, s.heads_q, s.head_dim}), lse(DType::float32, {s.heads_q, total_q});
  out.poison();
  lse.poison();
  DeviceBuffer dout = upload(out), dlse = upload(lse);
  kv_cache_decode(f.dev, qd, cud, f.config(), on_device(out.view(), dout.get()),
                  on_device(lse.view(), dlse.get()), f.cuda());
  // Wide enough for any length the cache can hold, as a caller that does
  // not read seqlens back would size it.
  const int64_t width =
      std::min(s.top_k, (f.capacity + s.block_size - 1) / s.block_size) + 1;  // +1: padding
  Tensor sel(DType::int32, {total_q, s.heads_q, width}), ref_sel = sel;
  std::fill_n(ints(sel), sel.numel(), 12345);
  DeviceBuffer dsel = upload(sel);
  kv_cache_routing(f.dev, qd, cud, f.config(), on_device(sel.view(), dsel.get()), f.cuda());
  f.sync();
  download(dout, out);
  download(dlse, lse);
  download(dsel, sel);

  kv_cache_routing(f.cache, q.view(), cu_q.view(), f.config(), ref_sel.view());
  const CachePrefix p = f.prefix();
  Inputs in;
  in.q = q.view();
  in.k = p.k.view();
  in.v = p.v.view();
  in.cu_seqlens_q = cu_q.view();
  in.cu_seqlens_k = p.cu_k.view();
  Tensor ref_out(s.dtype, {total_q, s.heads_q, s.head_dim}),
      ref_lse(DType::float32, {s.heads_q, total_q});
  ExecOptions cpu;
  cpu.backend = Backend::cpu;
  forward(in, f.config(), ref_out.view(), ref_lse.view(), cpu);

  const double tol = output_tolerance(s.dtype);
  int differing = 0, rows = 0;
  for (int64_t b = 0; b < f.batch; ++b)
    for (int64_t t = ints(cu_q)[b]; t < ints(cu_q)[b + 1]; ++t)
      for (int64_t h = 0; h < s.heads_q; ++h) {
        ++rows;
        const int32_t* a = ints(sel) + (t * s.heads_q + h) * width;
        const int32_t* e = ints(ref_sel) + (t * s.heads_q + h) * width;
        if (!std::equal(a, a + width, e)) {
          // Same count and current block, ascending; the past blocks may
          // differ only within the near-tie allowance.
          const auto n = std::count_if(e, e + width, [](int32_t x) { return x >= 0; });
          const auto na = std::count_if(a, a + width, [](int32_t x) { return x >= 0; });
          ASSERT_EQ(na, n) << "selection size at token " << t << " head " << h;
          ASSERT_TRUE(std::is_sorted(a, a + na)) << "token " << t << " head " << h;
          ASSERT_EQ(a[n - 1], e[n - 1]) << "current block at token " << t << " head " << h;
          std::vector<int32_t> only_a, only_e;
          std::set_difference(a, a + n, e, e + n, std::back_inserter(only_a));
          std::set_difference(e, e + n, a, a + n, std::back_inserter(only_e));
          for (int32_t x : only_a)
            for (int32_t y : only_e) {
              const auto [sx, mx] = gate_score(f, q, t, h, b, x);
              const auto [sy, my] = gate_score(f, q, t, h, b, y);
              EXPECT_LE(std::abs(sx - sy), 1e-5 * std::max(mx, my) + 1e-12)
                  << "token " << t << " head " << h << ": cuda chose block " << x << " (score "
                  << sx << "), cpu block " << y << " (score " << sy << ")";
            }
          // A shared selection differs for the whole group at once: count it once.
          if (!s.shared || h % (s.heads_q / s.heads_kv) == 0) ++differing;
          continue;  // outputs legitimately differ for this row
        }
        for (int64_t c = 0; c < s.head_dim; ++c) {
          const int64_t i = (t * s.heads_q + h) * s.head_dim + c;
          const double err = std::abs(static_cast<double>(out.get(i)) - ref_out.get(i));
          if (!(err <= tol)) {
            ADD_FAILURE() << "out[" << t << ", " << h << ", " << c << "] = " << out.get(i)
                          << ", cpu forward " << ref_out.get(i);
            return;
          }
        }
        const double l = lse.get(h * total_q + t), rl = ref_lse.get(h * total_q + t);
        if (!(std::abs(l - rl) <= 2e-3)) {
          ADD_FAILURE() << "lse[" << h << ", " << t << "] = " << l << ", cpu forward " << rl;
          return;
        }
      }
  EXPECT_LE(differing, std::max(2, rows / 100)) << "too many near-tie selection differences";
}

// Builds the cache in random rounds; after each round checks the state and
// decodes the tokens it added (chunked prefill, or decode for one token).
void run_rounds(const Shape& shape, bool single_tokens_at_end, int max_rounds = 30) {
  SCOPED_TRACE(describe(shape));
  Twin f(shape);
  std::vector<int64_t> counts(static_cast<size_t>(f.batch));
  for (int round = 0; round < max_rounds; ++round) {
    bool any = false;
    for (int64_t b = 0; b < f.batch; ++b) {
      const int64_t left = shape.lens[static_cast<size_t>(b)] - f.length(b);
      const int64_t cap = single_tokens_at_end && left <= 3 ? 1 : 1 + left / 2;
      counts[static_cast<size_t>(b)] =
          left == 0 ? 0 : std::uniform_int_distribution<int64_t>(0, std::min(left, cap))(f.rng);
      any = any || left > 0;
    }
    if (!any) break;
    f.append(counts);
    check_state(f);
    check_decode(f, counts);
    if (::testing::Test::HasFailure()) return;
  }
  for (int64_t b = 0; b < f.batch; ++b)
    counts[static_cast<size_t>(b)] = shape.lens[static_cast<size_t>(b)] - f.length(b);
  f.append(counts);
  check_state(f);
  for (int64_t b = 0; b < f.batch; ++b) counts[static_cast<size_t>(b)] = f.length(b) > 0 ? 1 : 0;
  check_decode(f, counts);  // one decode query per non-empty sequence
}

TEST(CudaDecode, RandomShapes) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(20251123);
  for (int rep = 0; rep < 24; ++rep) {
    Shape s;
    s.dtype = rep % 2 == 0 ? DType::float16 : DType::bfloat16;
    s.head_dim = (rep / 2) % 2 == 0 ? 64 : 128;
    // Pages smaller than, equal to and larger than the kernel's 16-key tile.
    const int64_t pages[] = {0, 0, 1, 2, 4, 16, 32, 64};
    s.page_size = pages[std::uniform_int_distribution<int>(0, 7)(rng)];
    s.seed = rng();
    const int batch = std::uniform_int_distribution<int>(1, 4)(rng);
    for (int b = 0; b < batch; ++b)
      s.lens.push_back(std::uniform_int_distribution<int>(0, 6)(rng) == 0
                           ? std::uniform_int_distribution<int>(0, 1)(rng)  // empty or 1 token
                           : std::uniform_int_distribution<int>(2, 160)(rng));
    if (*std::max_element(s.lens.begin(), s.lens.end()) == 0) s.lens[0] = 7;
    // Group 16: a decode step has more rows per kv group than one 8-row pass.
    const int64_t gqa[] = {1, 4, 8, 16};
    s.heads_kv = std::uniform_int_distribution<int64_t>(1, 2)(rng);
    s.heads_q = s.heads_kv * gqa[std::uniform_int_distribution<int>(0, 3)(rng)];
    const int64_t unit = s.page_size == 0 ? 1 : s.page_size;
    s.block_size =
        unit * std::uniform_int_distribution<int64_t>(1, std::max<int64_t>(1, 40 / unit))(rng);
    const int64_t top_ks[] = {1, 2, 3, 4, 6, 100};
    s.top_k = top_ks[std::uniform_int_distribution<int>(0, 5)(rng)];
    s.shared = rng() % 3 == 0;
    run_rounds(s, rep % 3 == 0);
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(CudaDecode, EdgeShapes) {
  SKIP_WITHOUT_GPU();
  std::vector<Shape> shapes(8);
  shapes[0].lens = {37, 0, 9, 1};  // page = block = 1, empty and 1-token sequences
  shapes[0].page_size = 1;
  shapes[0].block_size = 1;
  shapes[0].top_k = 4;
  shapes[1].lens = {50, 17};  // top-k >= blocks: dense
  shapes[1].top_k = 100;
  shapes[2].lens = {20, 3};  // block larger than every sequence
  shapes[2].block_size = 64;
  shapes[3].lens = {70, 33};  // GQA 8, shared routing, bf16
  shapes[3].heads_q = 16;
  shapes[3].heads_kv = 2;
  shapes[3].shared = true;
  shapes[3].dtype = DType::bfloat16;
  shapes[4].lens = {45, 31};  // D 128, paged
  shapes[4].head_dim = 128;
  shapes[4].page_size = 8;
  shapes[4].block_size = 16;
  shapes[5].lens = {300};  // top-k 1: the current block only
  shapes[5].block_size = 4;
  shapes[5].top_k = 1;
  shapes[6].lens = {1500};  // one long sequence: split-K over big blocks, GQA 4
  shapes[6].heads_q = 8;
  shapes[6].heads_kv = 2;
  shapes[6].head_dim = 128;
  shapes[6].block_size = 512;
  shapes[6].top_k = 2;
  shapes[7].lens = {900, 400, 0};  // paged with pages of 16, block 64, top-k 3, bf16
  shapes[7].page_size = 16;
  shapes[7].block_size = 64;
  shapes[7].heads_q = 8;
  shapes[7].heads_kv = 1;
  shapes[7].dtype = DType::bfloat16;
  for (const Shape& s : shapes) {
    run_rounds(s, true, 8);
    if (::testing::Test::HasFailure()) return;
  }
}

// The workspace budget forces one query token per attention launch and
// routing scores in global memory (more blocks than shared memory holds).
// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { ::setenv(name, value, 1); }
  ~ScopedEnv() { ::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

TEST(CudaDecode, SmallBudgetAndManyBlocks) {
  SKIP_WITHOUT_GPU();
  const ScopedEnv budget("MOBA_CUDA_DECODE_BYTES", "1");
  Shape s;
  s.lens = {8300, 40};
  s.block_size = 1;  // 8300 blocks: beyond the shared-memory score buffer
  s.top_k = 5;
  s.heads_q = 4;
  s.heads_kv = 2;
  SCOPED_TRACE(describe(s));
  Twin f(s);
  f.append({8290, 30});
  check_state(f);
  f.append({7, 8});
  check_state(f);
  check_decode(f, {7, 8});  // chunked prefill, one token per launch
  f.append({3, 2});
  check_decode(f, {1, 1});
}

// Split-K chunks forced by MOBA_CUDA_DECODE_SPLIT (the launch would pick
// other splits on a given GPU): chunks down to one 16-key tile, chunks that
// give the CTA's 4 warps unequal tile counts, units whose last tile is cut
// (blocks of 100 keys), whole 512-key blocks per CTA (each warp's cp.async
// ring wraps around several times), pages smaller and larger than a tile
// (powers of two, found by shifts, and not: 12 and 48, by divisions),
// group 16 (two 8-row passes per chunk), dense, and chunked prefill (every
// round decodes the tokens it appended, so key tiles are cut by each row's
// position).
struct ForcedSplitCase {
  const char* name;
  const char* split;
  Shape shape;
};

std::vector<ForcedSplitCase> forced_split_cases() {
  std::vector<ForcedSplitCase> cases(7);
  cases[0].name = "chunks_48_48_4_block100_page4";
  cases[0].split = "3";  // chunks of 48, 48 and 4 keys
  cases[0].shape.lens = {450, 233};
  cases[0].shape.heads_q = 16;
  cases[0].shape.heads_kv = 1;
  cases[0].shape.block_size = 100;
  cases[0].shape.page_size = 4;
  cases[0].shape.top_k = 3;
  cases[1].name = "unequal_warps_block512_shared_bf16";
  cases[1].split = "7";  // 6 chunks of 80 keys (warps 2, 1, 1, 1 tiles) and one of 32
  cases[1].shape.lens = {1100};
  cases[1].shape.heads_q = 8;
  cases[1].shape.heads_kv = 2;
  cases[1].shape.head_dim = 128;
  cases[1].shape.block_size = 512;
  cases[1].shape.page_size = 32;
  cases[1].shape.top_k = 2;  // one of the past blocks: the routing chooses
  cases[1].shape.shared = true;
  cases[1].shape.dtype = DType::bfloat16;
  cases[2] = cases[1];
  cases[2].name = "whole_blocks_block512_fp16";
  cases[2].split = "1";  // whole blocks: 32 tiles per CTA, 8 per warp
  cases[2].shape.page_size = 64;
  cases[2].shape.shared = false;
  cases[2].shape.dtype = DType::float16;
  cases[3].name = "one_tile_chunks_block40_page8";
  cases[3].split = "32";  // more chunks than tiles: chunks of one tile
  cases[3].shape.lens = {261, 77, 140};
  cases[3].shape.heads_q = 4;
  cases[3].shape.heads_kv = 1;
  cases[3].shape.block_size = 40;
  cases[3].shape.page_size = 8;
  cases[3].shape.top_k = 2;
  cases[3].shape.dtype = DType::bfloat16;
  cases[4].name = "dense_group8_block16";
  cases[4].split = "5";  // dense: units of 64 keys in chunks of 16
  cases[4].shape.lens = {300, 130};
  cases[4].shape.heads_q = 16;
  cases[4].shape.heads_kv = 2;
  cases[4].shape.head_dim = 128;
  cases[4].shape.block_size = 16;
  cases[4].shape.top_k = 100;
  cases[5].name = "pages_of_48_block144_shared";
  cases[5].split = "2";  // pages of 48 keys: whole tiles in one page, found by a division
  cases[5].shape.lens = {500, 61};
  cases[5].shape.heads_q = 8;
  cases[5].shape.heads_kv = 2;
  cases[5].shape.block_size = 144;
  cases[5].shape.page_size = 48;
  cases[5].shape.top_k = 2;
  cases[5].shape.shared = true;
  cases[6].name = "pages_of_12_block36_bf16";
  cases[6].split = "2";  // pages of 12 keys: every key looked up (a division each)
  cases[6].shape.lens = {300, 100};
  cases[6].shape.heads_q = 4;
  cases[6].shape.heads_kv = 1;
  cases[6].shape.head_dim = 128;
  cases[6].shape.block_size = 36;
  cases[6].shape.page_size = 12;
  cases[6].shape.top_k = 3;
  cases[6].shape.dtype = DType::bfloat16;
  return cases;
}

void PrintTo(const ForcedSplitCase& c, std::ostream* os) {
  *os << c.name;
}

// One case per test, so a sanitizer run can take any subset by name.
class CudaDecodeForcedSplits : public ::testing::TestWithParam<ForcedSplitCase> {};

TEST_P(CudaDecodeForcedSplits, CutUnitsIntoShortChunks) {
  SKIP_WITHOUT_GPU();
  const ForcedSplitCase& c = GetParam();
  const ScopedEnv split("MOBA_CUDA_DECODE_SPLIT", c.split);
  run_rounds(c.shape, true, 6);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaDecodeForcedSplits, ::testing::ValuesIn(forced_split_cases()),
                         [](const ::testing::TestParamInfo<ForcedSplitCase>& info) {
                           return std::string(info.param.name);
                         });

// One long sequence at batch 1: few (sequence, kv head, block) work items,
// so the launch splits every block into many key chunks (up to block / 128)
// and each row's output is merged from dozens of partials by the CTA that
// writes the last of them. Per-head routing (the group reads the union of
// its heads' blocks) and shared routing, fp16 and bf16.
TEST(CudaDecode, LongSequenceManyChunksPerBlock) {
  SKIP_WITHOUT_GPU();
  for (const bool shared : {false, true}) {
    Shape s;
    s.lens = {9000};
    s.heads_q = 8;
    s.heads_kv = 2;
    s.head_dim = 128;
    s.block_size = 1024;
    s.top_k = 4;
    s.shared = shared;
    s.dtype = shared ? DType::bfloat16 : DType::float16;
    SCOPED_TRACE(describe(s));
    Twin f(s);
    f.append({8990});
    check_state(f);
    check_decode(f, {1});
    f.append({6});
    check_decode(f, {3});  // a short chunk: rows ending in different chunks of the block
    f.append({4});
    check_decode(f, {1});
    if (::testing::Test::HasFailure()) return;
  }
}

// A recycled slot (seqlens reset to 0) restarts its block sums.
TEST(CudaDecode, RecycledSlotRestartsItsSums) {
  SKIP_WITHOUT_GPU();
  Shape s;
  s.lens = {30, 12};
  Twin f(s);
  f.append({30, 12});
  ints(f.seqlens)[0] = 0;
  upload(f.seqlens, f.dseqlens);
  f.k_all.randn(f.rng);  // different keys, so a stale sum would show
  f.v_all.randn(f.rng);
  f.append({13, 0});
  check_state(f);
  check_decode(f, {2, 0});
}

// A decode captured in a CUDA graph and replayed gives the direct result:
// no host synchronization or host read of device data inside. Replayed
// twice: the per-call tables (routing marks, work list, merge counters) are
// reset inside the graph, so a second replay must give the same bits.
TEST(CudaDecode, CapturedInAGraph) {
  SKIP_WITHOUT_GPU();
  Shape s;
  s.lens = {200, 90};
  s.block_size = 16;
  s.top_k = 3;
  s.heads_q = 8;
  s.heads_kv = 2;
  Twin f(s);
  f.append({200, 90});
  Tensor q(s.dtype, {2, s.heads_q, s.head_dim});
  q.randn(f.rng);
  const Tensor cu = int_tensor({0, 1, 2});
  const DeviceBuffer dq = upload(q), dcu = upload(cu);
  Tensor out(s.dtype, {2, s.heads_q, s.head_dim});
  out.poison();
  DeviceBuffer direct = upload(out), replay = upload(out);
  const auto decode = [&](const DeviceBuffer& dst) {
    kv_cache_decode(f.dev, on_device(q.view(), dq.get()), on_device(cu.view(), dcu.get()),
                    f.config(), on_device(out.view(), dst.get()), {}, f.cuda());
  };
  decode(direct);
  f.sync();
  cudaGraph_t graph = nullptr;
  cuda_ok(cudaStreamBeginCapture(f.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  decode(replay);
  cuda_ok(cudaStreamEndCapture(f.stream, &graph), "end capture");
  cudaGraphExec_t exec = nullptr;
  cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  const Tensor a = fetch(direct, s.dtype, out.shape());
  for (int replay_round = 0; replay_round < 2; ++replay_round) {
    upload(out, replay);  // poisoned again: the replay must rewrite every element
    cuda_ok(cudaGraphLaunch(exec, f.stream), "launch");
    f.sync();
    const Tensor b = fetch(replay, s.dtype, out.shape());
    for (int64_t i = 0; i < a.numel(); ++i)
      ASSERT_EQ(a.get(i), b.get(i)) << "element " << i << " of replay " << replay_round;
  }
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}

// ---- invalid device values: poisoned outputs, untouched cache, no crash ----

struct Poisoned {
  Tensor out, lse, sel;
};

Poisoned decode_raw(Twin& f, const Tensor& q, const std::vector<int32_t>& cu_q) {
  const Tensor cu = int_tensor(cu_q);
  const DeviceBuffer dq = upload(q), dcu = upload(cu);
  const int64_t total = q.shape()[0];
  Poisoned r{Tensor(f.s.dtype, {total, f.s.heads_q, f.s.head_dim}),
             Tensor(DType::float32, {f.s.heads_q, total}),
             Tensor(DType::int32, {total, f.s.heads_q, f.s.top_k})};
  r.out.poison();
  r.lse.poison();
  std::fill_n(ints(r.sel), r.sel.numel(), 7);
  DeviceBuffer dout = upload(r.out), dlse = upload(r.lse), dsel = upload(r.sel);
  kv_cache_decode(f.dev, on_device(q.view(), dq.get()), on_device(cu.view(), dcu.get()), f.config(),
                  on_device(r.out.view(), dout.get()), on_device(r.lse.view(), dlse.get()),
                  f.cuda());
  kv_cache_routing(f.dev, on_device(q.view(), dq.get()), on_device(cu.view(), dcu.get()),
                   f.config(), on_device(r.sel.view(), dsel.get()), f.cuda());
  f.sync();
  download(dout, r.out);
  download(dlse, r.lse);
  download(dsel, r.sel);
  return r;
}

// Whether every output of query token t is NaN (and its selection all -1).
bool poisoned_row(const Twin& f, const Poisoned& p, int64_t t) {
  const Shape& s = f.s;
  const int64_t total = p.out.shape()[0];
  for (int64_t h = 0; h < s.heads_q; ++h) {
    for (int64_t c = 0; c < s.head_dim; ++c)
      if (!std::isnan(p.out.get((t * s.heads_q + h) * s.head_dim + c))) return false;
    if (!std::isnan(p.lse.get(h * total + t))) return false;
    for (int64_t w = 0; w < s.top_k; ++w)
      if (ints(p.sel)[(t * s.heads_q + h) * s.top_k + w] != -1) return false;
  }
  return true;
}

bool finite_row(const Twin& f, const Poisoned& p, int64_t t) {
  const Shape& s = f.s;
  for (int64_t i = t * s.heads_q * s.head_dim; i < (t + 1) * s.heads_q * s.head_dim; ++i)
    if (!std::isfinite(p.out.get(i))) return false;
  return ints(p.sel)[t * s.heads_q * s.top_k] >= 0;
}

Shape invalid_shape() {
  Shape s;
  s.lens = {40, 24};
  s.page_size = 4;
  s.block_size = 8;
  s.top_k = 3;
  return s;
}

TEST(CudaDecodeInvalid, BadCuSeqlensPoisonEverything) {
  SKIP_WITHOUT_GPU();
  Twin f(invalid_shape());
  f.append({40, 24});
  Tensor q(f.s.dtype, {3, f.s.heads_q, f.s.head_dim});
  q.randn(f.rng);
  for (const std::vector<int32_t>& cu : {std::vector<int32_t>{1, 2, 3},     // does not start at 0
                                         std::vector<int32_t>{0, 2, 2},     // does not end at total
                                         std::vector<int32_t>{0, 3, 1}}) {  // decreasing
    const Poisoned p = decode_raw(f, q, cu);
    for (int64_t t = 0; t < 3; ++t)
      EXPECT_TRUE(poisoned_row(f, p, t)) << "token " << t << " cu " << cu[0] << cu[1] << cu[2];
  }
}

TEST(CudaDecodeInvalid, OneBadSequencePoisonsOnlyItsRows) {
  SKIP_WITHOUT_GPU();
  Twin f(invalid_shape());
  f.append({40, 24});
  Tensor q(f.s.dtype, {3, f.s.heads_q, f.s.head_dim});
  q.randn(f.rng);
  // len_q > seqlens for sequence 1.
  ints(f.seqlens)[1] = 1;
  upload(f.seqlens, f.dseqlens);
  Poisoned p = decode_raw(f, q, {0, 1, 3});
  EXPECT_TRUE(finite_row(f, p, 0));
  EXPECT_TRUE(poisoned_row(f, p, 1));
  EXPECT_TRUE(poisoned_row(f, p, 2));
  // seqlens beyond the capacity.
  ints(f.seqlens)[1] = static_cast<int32_t>(f.capacity + 1);
  upload(f.seqlens, f.dseqlens);
  p = decode_raw(f, q, {0, 1, 3});
  EXPECT_TRUE(finite_row(f, p, 0));
  EXPECT_TRUE(poisoned_row(f, p, 2));
  ints(f.seqlens)[1] = 24;
  upload(f.seqlens, f.dseqlens);
  // A page-table entry outside the pool for sequence 0 (a cached page).
  Tensor table = f.page_table;
  ints(table)[2] = static_cast<int32_t>(f.num_pages + 5);
  upload(table, f.dtable);
  p = decode_raw(f, q, {0, 1, 3});
  EXPECT_TRUE(poisoned_row(f, p, 0));
  EXPECT_TRUE(finite_row(f, p, 1));
  EXPECT_TRUE(finite_row(f, p, 2));
  upload(f.page_table, f.dtable);
}

TEST(CudaDecodeInvalid, RoutingWiderThanSelectedIsAllMinusOne) {
  SKIP_WITHOUT_GPU();
  Twin f(invalid_shape());
  f.append({40, 24});
  Tensor q(f.s.dtype, {2, f.s.heads_q, f.s.head_dim});
  q.randn(f.rng);
  const Tensor cu = int_tensor({0, 1, 2});
  const DeviceBuffer dq = upload(q), dcu = upload(cu);
  Tensor sel(DType::int32, {2, f.s.heads_q, 2});  // top-k 3 needs 3 slots
  std::fill_n(ints(sel), sel.numel(), 7);
  DeviceBuffer dsel = upload(sel);
  kv_cache_routing(f.dev, on_device(q.view(), dq.get()), on_device(cu.view(), dcu.get()),
                   f.config(), on_device(sel.view(), dsel.get()), f.cuda());
  f.sync();
  download(dsel, sel);
  for (int64_t i = 0; i < sel.numel(); ++i) EXPECT_EQ(ints(sel)[i], -1) << "entry " << i;
}

TEST(CudaDecodeInvalid, BadAppendWritesNothingForThatSequence) {
  SKIP_WITHOUT_GPU();
  Twin f(invalid_shape());
  f.append({10, 6});
  const Tensor k_before = fetch(f.dk, f.s.dtype, f.k.shape());
  const Tensor sums_before = fetch(f.dsums, DType::float32, f.sums.shape());
  const int64_t hkv = f.s.heads_kv, d = f.s.head_dim;
  Tensor kn(f.s.dtype, {4, hkv, d}), vn(f.s.dtype, {4, hkv, d});
  kn.randn(f.rng);
  vn.randn(f.rng);
  const DeviceBuffer dkn = upload(kn), dvn = upload(vn);
  const auto append_raw = [&](const std::vector<int32_t>& cu_v) {
    const Tensor cu = int_tensor(cu_v);
    const DeviceBuffer dcu = upload(cu);
    kv_cache_append(f.dev, on_device(kn.view(), dkn.get()), on_device(vn.view(), dvn.get()),
                    on_device(cu.view(), dcu.get()), f.cuda());
    f.sync();
    return fetch(f.dseqlens, DType::int32, {f.batch});
  };
  // Sequence 0 would overflow its capacity: only sequence 1 is appended.
  ints(f.seqlens)[0] = static_cast<int32_t>(f.capacity - 1);
  upload(f.seqlens, f.dseqlens);
  Tensor lens = append_raw({0, 2, 4});
  EXPECT_EQ(ints(lens)[0], f.capacity - 1);
  EXPECT_EQ(ints(lens)[1], 8);
  // cu_seqlens_new not ending at the row count: nothing at all.
  ints(f.seqlens)[0] = 10;
  ints(f.seqlens)[1] = 6;
  upload(f.seqlens, f.dseqlens);
  lens = append_raw({0, 2, 3});
  EXPECT_EQ(ints(lens)[0], 10);
  EXPECT_EQ(ints(lens)[1], 6);
  // A page of sequence 0's new tokens outside the pool (entry 2 covers
  // tokens 8..11; sequence 0 holds 10): sequence 0 untouched.
  Tensor table = f.page_table;
  ints(table)[2] = -3;
  upload(table, f.dtable);
  lens = append_raw({0, 2, 4});
  EXPECT_EQ(ints(lens)[0], 10);
  EXPECT_EQ(ints(lens)[1], 8);
  upload(f.page_table, f.dtable);
  // Sequence 0's K rows and block sums were never written by those calls.
  const Tensor k_after = fetch(f.dk, f.s.dtype, f.k.shape());
  const Tensor sums_after = fetch(f.dsums, DType::float32, f.sums.shape());
  const int64_t row = hkv * d;
  for (int64_t t = 0; t < f.capacity; ++t) {
    if (t / f.s.page_size < f.max_pages && ints(f.page_table)[t / f.s.page_size] < 0) continue;
    for (int64_t i = 0; i < row; ++i) {
      const int64_t at = f.row_offset(0, t) + i;
      ASSERT_EQ(std::isnan(k_after.get(at)), std::isnan(k_before.get(at))) << "token " << t;
      if (!std::isnan(k_before.get(at))) {
        ASSERT_EQ(k_after.get(at), k_before.get(at)) << "token " << t;
      }
    }
  }
  for (int64_t i = 0; i < f.max_blocks * row; ++i) {
    if (std::isnan(sums_before.get(i))) {
      ASSERT_TRUE(std::isnan(sums_after.get(i))) << "block sums of sequence 0, element " << i;
    } else {
      ASSERT_EQ(sums_after.get(i), sums_before.get(i)) << "block sums of sequence 0, element " << i;
    }
  }
}

// ---- host-side refusals ----

TEST(CudaDecodeErrors, HostCheckableArgumentsAreRefused) {
  SKIP_WITHOUT_GPU();
  Twin f(invalid_shape());
  f.append({4, 4});
  Tensor q(f.s.dtype, {2, f.s.heads_q, f.s.head_dim}), out = q;
  const Tensor cu = int_tensor({0, 1, 2});
  const DeviceBuffer dq = upload(q), dcu = upload(cu), dout = upload(out);
  const TensorView qd = on_device(q.view(), dq.get()), cud = on_device(cu.view(), dcu.get()),
                   outd = on_device(out.view(), dout.get());
  // Mixed devices: host queries against a device cache.
  expect_contains(
      error_of([&] { kv_cache_decode(f.dev, q.view(), cud, f.config(), outd, {}, f.cuda()); },
               Status::invalid_argument),
      "q: on a different device than cache.k");
  // A device cache with the cpu backend.
  ExecOptions cpu;
  cpu.backend = Backend::cpu;
  expect_contains(error_of([&] { kv_cache_decode(f.dev, qd, cud, f.config(), outd, {}, cpu); },
                           Status::invalid_argument),
                  "backend cpu expects host tensors");
  // A host cache with the cuda backend.
  expect_contains(error_of(
                      [&] {
                        kv_cache_decode(f.cache, q.view(), cu.view(), f.config(), out.view(), {},
                                        f.cuda());
                      },
                      Status::invalid_argument),
                  "backend cuda expects the cache on a CUDA device");
  // Host memory labelled as device memory.
  KVCache lying = f.dev;
  lying.k.data = f.k.data();
  expect_contains(error_of([&] { kv_cache_decode(lying, qd, cud, f.config(), outd, {}, f.cuda()); },
                           Status::invalid_argument),
                  "cache.k: the cuda backend expects device memory");
  // fp32 caches and head dim 32 are not supported by the kernels.
  Shape s32 = invalid_shape();
  s32.dtype = DType::float32;
  Twin f32(s32);
  expect_contains(error_of(
                      [&] {
                        f32.append({1, 1});
                      },
                      Status::unsupported),
                  "cache.k: the cuda backend supports float16 and bfloat16 caches, got float32");
  Shape d32 = invalid_shape();
  d32.head_dim = 32;
  Twin f_d32(d32);
  expect_contains(error_of(
                      [&] {
                        f_d32.append({1, 1});
                      },
                      Status::unsupported),
                  "supports head dims 64 and 128, got 32");
}

// Without a GPU (or without the CUDA runtime) a device cache is refused
// with backend_unavailable, before anything is read.
TEST(CudaDecodeErrors, DeviceCacheWithoutGpuIsUnavailable) {
  if (have_gpu()) {
    GTEST_SKIP() << "a CUDA device is present";
  }
  Shape s = invalid_shape();
  s.lens = {4};
  Tensor k(s.dtype, {2, 4, 1, 64}), v = k, table(DType::int32, {1, 2}), lens(DType::int32, {1}),
                                    sums(DType::float32, {1, 1, 1, 64});
  KVCache c;
  c.k = on_device(k.view(), k.data());
  c.v = on_device(v.view(), v.data());
  c.page_table = on_device(table.view(), table.data());
  c.seqlens = on_device(lens.view(), lens.data());
  c.block_sums = on_device(sums.view(), sums.data());
  c.block_size = 8;
  Tensor kn(s.dtype, {1, 1, 64});
  const Tensor cu = int_tensor({0, 1});
  expect_contains(error_of(
                      [&] {
                        kv_cache_append(c, on_device(kn.view(), kn.data()),
                                        on_device(kn.view(), kn.data()),
                                        on_device(cu.view(), const_cast<void*>(cu.data())));
                      },
                      Status::backend_unavailable),
                  "no CUDA device is available");
}

}  // namespace
}  // namespace moba::testing
