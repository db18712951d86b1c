#include "dispatch/scene.hpp"

#include <algorithm>
#include <cctype>
#include <limits>
#include <random>
#include <utility>

namespace moba::testing {

const char* op_name(Op op) {
  switch (op) {
    case Op::forward:
      return "forward";
    case Op::backward:
      return "backward";
    case Op::routing:
      return "routing";
  }
  return "unknown";
}

namespace {

// Bytes behind every tensor of a scene: far more than any view of the table needs.
constexpr size_t kBufferDoubles = 16384;

enum Buffer : size_t { kQ, kK, kV, kCuQ, kCuK, kOut, kLse, kDout, kDq, kDk, kDv, kSelected };

}  // namespace

void reshape(TensorView& view, std::initializer_list<int64_t> shape) {
  view = TensorView::contiguous(view.data, view.dtype, shape, view.device);
}

void* element_address(const TensorView& view, int64_t elements) {
  return static_cast<unsigned char*>(view.data) + elements * dtype_size(view.dtype);
}

Scene::Scene() {
  for (auto& b : buffers_) b.assign(kBufferDoubles, 0.0);
  const auto at = [&](Buffer b) { return static_cast<void*>(buffers_[b].data()); };

  std::mt19937_64 rng(20240229);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Buffer b : {kQ, kK, kV, kDout}) {
    auto* f = static_cast<float*>(at(b));
    for (size_t i = 0; i < 2 * kBufferDoubles; ++i) f[i] = normal(rng);
  }

  in.q = TensorView::contiguous(at(kQ), DType::float32, {kTotal, kHeadsQ, kHeadDim});
  in.k = TensorView::contiguous(at(kK), DType::float32, {kTotal, kHeadsKv, kHeadDim});
  in.v = TensorView::contiguous(at(kV), DType::float32, {kTotal, kHeadsKv, kHeadDim});
  in.cu_seqlens_q = TensorView::contiguous(at(kCuQ), DType::int32, {4});
  in.cu_seqlens_k = TensorView::contiguous(at(kCuK), DType::int32, {4});
  set_cu_seqlens({0, 3, 3, 8}, {0, 3, 3, 8});
  cfg.block_size = kBlockSize;
  cfg.top_k = kTopK;
  opt.backend = Backend::reference;

  out = TensorView::contiguous(at(kOut), DType::float32, {kTotal, kHeadsQ, kHeadDim});
  lse = TensorView::contiguous(at(kLse), DType::float32, {kHeadsQ, kTotal});
  dout = TensorView::contiguous(at(kDout), DType::float32, {kTotal, kHeadsQ, kHeadDim});
  dq = TensorView::contiguous(at(kDq), DType::float32, {kTotal, kHeadsQ, kHeadDim});
  dk = TensorView::contiguous(at(kDk), DType::float32, {kTotal, kHeadsKv, kHeadDim});
  dv = TensorView::contiguous(at(kDv), DType::float32, {kTotal, kHeadsKv, kHeadDim});
  selected = TensorView::contiguous(at(kSelected), DType::int32, {kTotal, kHeadsQ, kRoutingWidth});

  // Backward reads out and lse as forward wrote them (a fast backend needs them).
  run(Op::forward);
}

void Scene::run(Op op) const {
  switch (op) {
    case Op::forward:
      forward(in, cfg, out, lse, opt);
      return;
    case Op::backward:
      backward(in, cfg, out, dout, lse, dq, dk, dv, opt);
      return;
    case Op::routing:
      routing(in, cfg, selected, opt);
      return;
  }
}

void Scene::set_cu_seqlens(const std::vector<int32_t>& q, const std::vector<int32_t>& k) {
  std::copy(q.begin(), q.end(), static_cast<int32_t*>(in.cu_seqlens_q.data));
  std::copy(k.begin(), k.end(), static_cast<int32_t*>(in.cu_seqlens_k.data));
  reshape(in.cu_seqlens_q, {static_cast<int64_t>(q.size())});
  reshape(in.cu_seqlens_k, {static_cast<int64_t>(k.size())});
}

void Scene::put_on_cuda() {
  const Device gpu{DeviceType::cuda, 0};
  for (TensorView* t : {&in.q, &in.k, &in.v, &in.cu_seqlens_q, &in.cu_seqlens_k, &out, &lse, &dout,
                        &dq, &dk, &dv, &selected})
    t->device = gpu;
  in.max_seqlen_q = kMaxSeqlen;
  in.max_seqlen_k = kMaxSeqlen;
}

namespace {

using Mutation = std::function<void(Scene&)>;

const std::vector<Op> kForward{Op::forward};
const std::vector<Op> kBackward{Op::backward};
const std::vector<Op> kRouting{Op::routing};
const std::vector<Op> kEvery{Op::forward, Op::backward, Op::routing};
const std::vector<Op> kForwardAndBackward{Op::forward, Op::backward};

constexpr Status kInvalid = Status::invalid_argument;
constexpr Status kUnsupported = Status::unsupported;

// Every host tensor of the scene, by the name the library gives it.
TensorView& tensor(Scene& s, std::string_view name) {
  if (name == "q") return s.in.q;
  if (name == "k") return s.in.k;
  if (name == "v") return s.in.v;
  if (name == "cu_seqlens_q") return s.in.cu_seqlens_q;
  if (name == "cu_seqlens_k") return s.in.cu_seqlens_k;
  if (name == "out") return s.out;
  if (name == "lse") return s.lse;
  if (name == "dout") return s.dout;
  if (name == "dq") return s.dq;
  if (name == "dk") return s.dk;
  if (name == "dv") return s.dv;
  if (name == "selected") return s.selected;
  ADD_FAILURE() << "no tensor named " << name;
  return s.in.q;
}

// The input and config breakages: make_problem rejects them before any
// output is looked at, so they apply to every operation.
void add_input_cases(std::vector<BadInput>& cases) {
  const auto add = [&](std::string name, Mutation m, Status status, std::vector<std::string> args,
                       std::vector<std::string> mentions = {}) {
    cases.push_back(BadInput{std::move(name), kEvery, std::move(m), status, std::move(args),
                             std::move(mentions)});
  };

  // Ranks and shapes.
  add("q_rank2", [](Scene& s) { reshape(s.in.q, {8, 32}); }, kInvalid, {"q"}, {"[total_q, Hq, D]"});
  add("q_rank4", [](Scene& s) { reshape(s.in.q, {8, 4, 2, 4}); }, kInvalid, {"q"});
  add("k_rank2", [](Scene& s) { reshape(s.in.k, {8, 16}); }, kInvalid, {"k"});
  add("v_rank4", [](Scene& s) { reshape(s.in.v, {8, 2, 2, 4}); }, kInvalid, {"v"});
  add("cu_seqlens_q_rank2",
      [](Scene& s) {
        reshape(s.in.cu_seqlens_q, {2, 2});
      },
      kInvalid, {"cu_seqlens_q"});
  add("cu_seqlens_k_rank0", [](Scene& s) { reshape(s.in.cu_seqlens_k, {}); }, kInvalid,
      {"cu_seqlens_k"});
  add("q_ndim5", [](Scene& s) { s.in.q.ndim = 5; }, kInvalid, {"q"});
  add("q_ndim_negative", [](Scene& s) { s.in.q.ndim = -1; }, kInvalid, {"q"});
  add("q_negative_size", [](Scene& s) { s.in.q.shape[0] = -8; }, kInvalid, {"q"});
  add("k_negative_stride", [](Scene& s) { s.in.k.strides[0] = -16; }, kUnsupported, {"k"});
  add("k_head_dim_differs", [](Scene& s) { reshape(s.in.k, {8, 2, 16}); }, kInvalid, {"k"}, {"16"});
  add("v_head_dim_differs",
      [](Scene& s) {
        reshape(s.in.v, {8, 2, 16});
      },
      kInvalid, {"v"}, {"[8, 2, 16]"});
  add("v_tokens_differ_from_k",
      [](Scene& s) {
        reshape(s.in.v, {7, 2, 8});
      },
      kInvalid, {"v"}, {"[8, 2, 8]"});
  add("v_heads_differ_from_k", [](Scene& s) { reshape(s.in.v, {8, 1, 8}); }, kInvalid, {"v"});
  add("heads_q_not_multiple_of_heads_kv",
      [](Scene& s) {
        reshape(s.in.q, {8, 3, 8});
      },
      kInvalid, {"q"}, {"3", "2"});
  add("heads_q_zero", [](Scene& s) { reshape(s.in.q, {8, 0, 8}); }, kInvalid, {"q"});
  add("heads_kv_zero",
      [](Scene& s) {
        reshape(s.in.k, {8, 0, 8});
        reshape(s.in.v, {8, 0, 8});
      },
      kInvalid, {"k"});

  // Dtypes.
  add("k_float16_q_float32", [](Scene& s) { s.in.k.dtype = DType::float16; }, kInvalid, {"k"},
      {"float16", "float32"});
  add("v_bfloat16_q_float32", [](Scene& s) { s.in.v.dtype = DType::bfloat16; }, kInvalid, {"v"},
      {"bfloat16", "float32"});
  add("qkv_int32", [](Scene& s) { s.in.q.dtype = s.in.k.dtype = s.in.v.dtype = DType::int32; },
      kUnsupported, {"q"}, {"int32"});
  add("cu_seqlens_q_float32", [](Scene& s) { s.in.cu_seqlens_q.dtype = DType::float32; }, kInvalid,
      {"cu_seqlens_q"}, {"int32"});
  add("cu_seqlens_k_float16", [](Scene& s) { s.in.cu_seqlens_k.dtype = DType::float16; }, kInvalid,
      {"cu_seqlens_k"}, {"int32"});

  // Head dims outside the supported set (a multiple of 8 in [8, 256]).
  for (int64_t d : {0, 4, 12, 264}) {
    add("head_dim_" + std::to_string(d),
        [d](Scene& s) {
          reshape(s.in.q, {8, 4, d});
          reshape(s.in.k, {8, 2, d});
          reshape(s.in.v, {8, 2, d});
        },
        kUnsupported, {"q"}, {std::to_string(d)});
  }

  // Layouts: the last dimension must be contiguous.
  for (const char* name : {"q", "k", "v"}) {
    add(std::string(name) + "_last_dim_strided",
        [name](Scene& s) {
          TensorView& t = tensor(s, name);
          t.strides = {t.shape[1] * 16, 16, 2, 0};
        },
        kUnsupported, {name}, {"stride"});
  }

  // cu_seqlens values (the scene's sequences are 3, 0 and 5 tokens long).
  const auto cu = [&](std::string name, std::vector<int32_t> q, std::vector<int32_t> k,
                      std::string arg, std::vector<std::string> mentions) {
    add(
        std::move(name), [q, k](Scene& s) { s.set_cu_seqlens(q, k); }, kInvalid, {std::move(arg)},
        std::move(mentions));
  };
  cu("cu_seqlens_q_decreasing", {0, 4, 3, 8}, {0, 4, 3, 8}, "cu_seqlens_q", {"non-decreasing"});
  cu("cu_seqlens_k_decreasing", {0, 3, 3, 8}, {0, 4, 3, 8}, "cu_seqlens_k", {"non-decreasing"});
  cu("cu_seqlens_q_negative_entry", {0, -1, 3, 8}, {0, 3, 3, 8}, "cu_seqlens_q", {});
  cu("cu_seqlens_q_starts_at_1", {1, 3, 3, 8}, {0, 3, 3, 8}, "cu_seqlens_q", {"start at 0"});
  cu("cu_seqlens_k_starts_at_minus_1", {0, 3, 3, 8}, {-1, 3, 3, 8}, "cu_seqlens_k", {"start at 0"});
  cu("cu_seqlens_q_ends_before_total_q", {0, 3, 3, 7}, {0, 3, 3, 8}, "cu_seqlens_q", {"total_q"});
  cu("cu_seqlens_q_entry_beyond_total_q", {0, 3, 9, 8}, {0, 3, 9, 8}, "cu_seqlens_q", {"total_q"});
  cu("cu_seqlens_k_entry_beyond_total_k", {0, 3, 3, 8}, {0, 3, 9, 8}, "cu_seqlens_k", {"total_k"});
  cu("cu_seqlens_lengths_differ", {0, 3, 3, 8}, {0, 3, 8}, "cu_seqlens_k", {"4"});
  cu("cu_seqlens_empty", {}, {}, "cu_seqlens_q", {});
  cu("len_q_exceeds_len_k", {0, 3, 3, 8}, {0, 2, 2, 8}, "cu_seqlens_q", {"len_q <= len_k"});
  add("cu_seqlens_k_ends_before_total_k",
      [](Scene& s) {  // one more key row than cu_seqlens_k accounts for
        reshape(s.in.k, {9, 2, 8});
        reshape(s.in.v, {9, 2, 8});
      },
      kInvalid, {"cu_seqlens_k"}, {"total_k"});

  // Config.
  for (int64_t b : {0, -4})
    add("block_size_" + std::string(b < 0 ? "negative" : "0"),
        [b](Scene& s) { s.cfg.block_size = b; }, kInvalid, {"block_size"}, {">= 1"});
  for (int64_t k : {0, -1})
    add("top_k_" + std::string(k < 0 ? "negative" : "0"), [k](Scene& s) { s.cfg.top_k = k; },
        kInvalid, {"top_k"}, {">= 1"});
  // The C config reads softmax_scale <= 0 as "the default" and cannot express
  // these the same way; tests/c_api checks its own semantics.
  const std::pair<const char*, float> scales[] = {
      {"nan", std::numeric_limits<float>::quiet_NaN()},
      {"inf", std::numeric_limits<float>::infinity()},
      {"minus_inf", -std::numeric_limits<float>::infinity()},
      {"0", 0.0f},
      {"negative", -0.125f}};
  for (const auto& [label, scale] : scales) {
    cases.push_back(BadInput{"softmax_scale_" + std::string(label),
                             kEvery,
                             [scale](Scene& s) { s.cfg.softmax_scale = scale; },
                             kInvalid,
                             {"softmax_scale"},
                             {"> 0"},
                             /*in_c_api=*/false});
  }

  // Null data behind a non-empty shape.
  for (const char* name : {"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"})
    add(std::string(name) + "_null", [name](Scene& s) { tensor(s, name).data = nullptr; }, kInvalid,
        {name}, {"null"});

  // Devices. Host-only backends must refuse device tensors before touching them.
  add("k_on_cuda_q_on_host",
      [](Scene& s) {
        s.in.k.device = {DeviceType::cuda, 0};
      },
      kInvalid, {"k"}, {"cuda:0", "cpu"});
  add("cu_seqlens_q_on_cuda_q_on_host",
      [](Scene& s) {
        s.in.cu_seqlens_q.device = {DeviceType::cuda, 0};
      },
      kInvalid, {"cu_seqlens_q"});
  add("v_on_another_cuda_device",
      [](Scene& s) {
        s.put_on_cuda();
        s.in.v.device.index = 1;
      },
      kInvalid, {"v"}, {"cuda:1", "cuda:0"});
  for (Backend b : {Backend::reference, Backend::cpu}) {
    add(std::string("cuda_tensors_backend_") + backend_name(b),
        [b](Scene& s) {
          s.put_on_cuda();
          s.opt.backend = b;
        },
        kInvalid, {"backend"}, {backend_name(b)});
  }
  add("cuda_cu_seqlens_without_max_seqlen",
      [](Scene& s) {
        s.put_on_cuda();
        s.in.max_seqlen_q = 0;
        s.in.max_seqlen_k = 0;
      },
      kInvalid, {"max_seqlen_q", "max_seqlen_k"});
#ifndef MOBA_WITH_CUDA
  add("backend_cuda_in_build_without_cuda", [](Scene& s) { s.opt.backend = Backend::cuda; },
      Status::backend_unavailable, {"backend"}, {"cuda"});
  add("cuda_tensors_backend_auto_in_build_without_cuda",
      [](Scene& s) {
        s.put_on_cuda();
        s.opt.backend = Backend::automatic;
      },
      Status::backend_unavailable, {"backend"}, {"cuda"});
#else
  // Without a GPU the backend itself is unavailable; with one, host tensors are refused.
  add("backend_cuda_with_host_tensors", [](Scene& s) { s.opt.backend = Backend::cuda; },
      backend_available(Backend::cuda) ? kInvalid : Status::backend_unavailable, {"backend"},
      {"cuda"});
#endif

  // max_seqlen bounds that are wrong (the longest sequence has 5 tokens).
  add("max_seqlen_q_below_longest", [](Scene& s) { s.in.max_seqlen_q = 4; }, kInvalid,
      {"max_seqlen_q"}, {"4", "5"});
  add("max_seqlen_k_below_longest", [](Scene& s) { s.in.max_seqlen_k = 1; }, kInvalid,
      {"max_seqlen_k"}, {"5"});
  add("max_seqlen_q_negative", [](Scene& s) { s.in.max_seqlen_q = -1; }, kInvalid,
      {"max_seqlen_q"});

  // Options. The C API spells these differently and tests them itself.
  cases.push_back(BadInput{"backend_unknown_enum",
                           kEvery,
                           [](Scene& s) { s.opt.backend = static_cast<Backend>(9); },
                           kInvalid,
                           {"backend"},
                           {"9"},
                           /*in_c_api=*/false});
  add("num_threads_negative",
      [](Scene& s) {
        s.opt.backend = Backend::cpu;
        s.opt.num_threads = -2;
      },
      kInvalid, {"num_threads"}, {">= 0"});
}

// Breakages of the tensors forward and backward write or read besides the inputs.
void add_output_cases(std::vector<BadInput>& cases) {
  const auto add = [&](std::string name, const std::vector<Op>& ops, Mutation m, Status status,
                       std::vector<std::string> args, std::vector<std::string> mentions = {}) {
    cases.push_back(
        BadInput{std::move(name), ops, std::move(m), status, std::move(args), std::move(mentions)});
  };

  // [tokens, heads, D] tensors: what each operation takes and the shape it expects.
  struct RowsTensor {
    const char* name;
    std::vector<Op> ops;
    int64_t heads;
  };
  const RowsTensor rows[] = {{"out", kForwardAndBackward, Scene::kHeadsQ},
                             {"dout", kBackward, Scene::kHeadsQ},
                             {"dq", kBackward, Scene::kHeadsQ},
                             {"dk", kBackward, Scene::kHeadsKv},
                             {"dv", kBackward, Scene::kHeadsKv}};
  for (const RowsTensor& r : rows) {
    const std::string n = r.name;
    const std::string expected = "[8, " + std::to_string(r.heads) + ", 8]";
    const int64_t other_heads = r.heads == Scene::kHeadsQ ? Scene::kHeadsKv : Scene::kHeadsQ;
    add(n + "_rank2", r.ops,
        [n](Scene& s) {
          reshape(tensor(s, n), {8, 32});
        },
        kInvalid, {n}, {expected});
    add(n + "_tokens_7", r.ops,
        [n, h = r.heads](Scene& s) {
          reshape(tensor(s, n), {7, h, 8});
        },
        kInvalid, {n}, {expected});
    add(n + "_heads_" + std::to_string(other_heads), r.ops,
        [n, other_heads](Scene& s) {
          reshape(tensor(s, n), {8, other_heads, 8});
        },
        kInvalid, {n}, {expected});
    add(n + "_head_dim_16", r.ops,
        [n, h = r.heads](Scene& s) {
          reshape(tensor(s, n), {8, h, 16});
        },
        kInvalid, {n}, {expected});
    add(n + "_float16", r.ops, [n](Scene& s) { tensor(s, n).dtype = DType::float16; }, kInvalid,
        {n}, {"float32", "float16"});
    add(n + "_null", r.ops, [n](Scene& s) { tensor(s, n).data = nullptr; }, kInvalid, {n},
        {"null"});
    add(n + "_last_dim_strided", r.ops,
        [n](Scene& s) {
          TensorView& t = tensor(s, n);
          t.strides = {t.shape[1] * 16, 16, 2, 0};
        },
        kUnsupported, {n}, {"stride"});
    add(n + "_negative_stride", r.ops, [n](Scene& s) { tensor(s, n).strides[0] *= -1; },
        kUnsupported, {n});
    add(n + "_on_cuda", r.ops,
        [n](Scene& s) {
          tensor(s, n).device = {DeviceType::cuda, 0};
        },
        kInvalid, {n}, {"cuda:0"});
  }

  // Outputs must not overlap themselves or any other argument.
  const auto alias = [&](const std::string& output, const std::vector<Op>& ops,
                         const std::string& other, int64_t shift) {
    add(output + "_overlaps_" + other + (shift ? "_by_one_element" : ""), ops,
        [output, other, shift](Scene& s) {
          TensorView& o = tensor(s, output);
          const TensorView& t = tensor(s, other);
          // With a shift, o starts at the last element of t: they share one element.
          o.data = element_address(t, shift ? t.numel() - 1 : 0);
        },
        kInvalid, {output, other}, {"overlap"});
  };
  for (const char* other : {"q", "k", "v", "lse", "cu_seqlens_q", "cu_seqlens_k"})
    alias("out", kForward, other, 0);
  alias("out", kForward, "q", 1);
  alias("out", kForward, "v", 1);
  for (const char* other : {"q", "k", "v", "cu_seqlens_k"}) alias("lse", kForward, other, 0);
  for (const char* grad : {"dq", "dk", "dv"})
    for (const char* other :
         {"q", "k", "v", "out", "dout", "lse", "cu_seqlens_q", "dq", "dk", "dv"})
      if (std::string_view(grad) != other) alias(grad, kBackward, other, 0);
  alias("dq", kBackward, "dk", 1);
  alias("dk", kBackward, "dv", 1);
  alias("dv", kBackward, "dout", 1);
  for (const char* name : {"out", "dq", "dk", "dv"}) {
    const auto& ops = std::string_view(name) == "out" ? kForward : kBackward;
    add(std::string(name) + "_token_stride_0", ops,
        [name](Scene& s) { tensor(s, name).strides[0] = 0; }, kInvalid, {name}, {"overlap"});
  }
  add("out_heads_share_memory", kForward, [](Scene& s) { s.out.strides[1] = 4; }, kInvalid, {"out"},
      {"overlap"});

  // lse: [Hq, total_q] float32; written by forward, read by backward.
  add("lse_rank1", kForwardAndBackward, [](Scene& s) { reshape(s.lse, {32}); }, kInvalid, {"lse"},
      {"[4, 8]"});
  add("lse_transposed", kForwardAndBackward,
      [](Scene& s) {
        reshape(s.lse, {8, 4});
      },
      kInvalid, {"lse"}, {"[4, 8]"});
  add("lse_float16", kForwardAndBackward, [](Scene& s) { s.lse.dtype = DType::float16; }, kInvalid,
      {"lse"}, {"float32"});
  add("lse_int32", kForwardAndBackward, [](Scene& s) { s.lse.dtype = DType::int32; }, kInvalid,
      {"lse"}, {"float32"});
  add("lse_on_cuda", kForwardAndBackward,
      [](Scene& s) {
        s.lse.device = {DeviceType::cuda, 0};
      },
      kInvalid, {"lse"});
  add("lse_negative_stride", kForwardAndBackward, [](Scene& s) { s.lse.strides[1] = -1; },
      kUnsupported, {"lse"});
  add("lse_tokens_share_memory", kForward,
      [](Scene& s) {
        s.lse.strides = {1, 0, 0, 0};
      },
      kInvalid, {"lse"}, {"overlap"});
  // Backward needs lse: an absent one (a default view) is an error there.
  add("lse_absent", kBackward, [](Scene& s) { s.lse = TensorView{}; }, kInvalid, {"lse"});

  // selected: [total_q, Hq, W] int32 with W >= routing_width (2 here).
  add("selected_too_narrow", kRouting,
      [](Scene& s) {
        reshape(s.selected, {8, 4, 1});
      },
      kInvalid, {"selected"}, {"W >= 2"});
  add("selected_width_0", kRouting,
      [](Scene& s) {
        reshape(s.selected, {8, 4, 0});
      },
      kInvalid, {"selected"}, {"W >= 2"});
  add("selected_rank2", kRouting,
      [](Scene& s) {
        reshape(s.selected, {8, 8});
      },
      kInvalid, {"selected"});
  add("selected_tokens_9", kRouting,
      [](Scene& s) {
        reshape(s.selected, {9, 4, 2});
      },
      kInvalid, {"selected"}, {"[8, 4, W]"});
  add("selected_heads_2", kRouting,
      [](Scene& s) {
        reshape(s.selected, {8, 2, 2});
      },
      kInvalid, {"selected"}, {"[8, 4, W]"});
  add("selected_float32", kRouting, [](Scene& s) { s.selected.dtype = DType::float32; }, kInvalid,
      {"selected"}, {"int32"});
  add("selected_float16", kRouting, [](Scene& s) { s.selected.dtype = DType::float16; }, kInvalid,
      {"selected"}, {"int32"});
  add("selected_null", kRouting, [](Scene& s) { s.selected.data = nullptr; }, kInvalid,
      {"selected"}, {"null"});
  add("selected_on_cuda", kRouting,
      [](Scene& s) {
        s.selected.device = {DeviceType::cuda, 0};
      },
      kInvalid, {"selected"});
  add("selected_last_dim_strided", kRouting,
      [](Scene& s) {
        s.selected.strides = {16, 4, 2, 0};
      },
      kUnsupported, {"selected"});
  add("selected_token_stride_0", kRouting, [](Scene& s) { s.selected.strides[0] = 0; }, kInvalid,
      {"selected"}, {"overlap"});
  for (const char* other : {"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"})
    alias("selected", kRouting, other, 0);
}

}  // namespace

std::vector<BadCall> bad_calls() {
  std::vector<BadInput> cases;
  add_input_cases(cases);
  add_output_cases(cases);
  std::vector<BadCall> calls;
  for (const BadInput& c : cases)
    for (Op op : c.ops) calls.push_back(BadCall{c, op});
  return calls;
}

void PrintTo(const BadCall& call, std::ostream* os) {
  *os << op_name(call.op) << " " << call.input.name;
}

std::string bad_call_name(const ::testing::TestParamInfo<BadCall>& info) {
  return std::string(op_name(info.param.op)) + "_" + info.param.input.name;
}

::testing::AssertionResult is_clear_error(std::string_view message,
                                          const std::vector<std::string>& arguments,
                                          const std::vector<std::string>& mentions) {
  if (!message.starts_with("moba: "))
    return ::testing::AssertionFailure() << "message does not start with \"moba: \": " << message;
  const auto word_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  };
  for (const std::string& arg : arguments) {
    bool named = false;
    for (size_t at = message.find(arg); at != std::string_view::npos && !named;
         at = message.find(arg, at + 1)) {
      const bool starts_word = at == 0 || !word_char(message[at - 1]);
      const bool ends_word =
          at + arg.size() == message.size() || !word_char(message[at + arg.size()]);
      named = starts_word && ends_word;
    }
    if (!named)
      return ::testing::AssertionFailure() << "message does not name '" << arg << "': " << message;
  }
  for (const std::string& m : mentions)
    if (message.find(m) == std::string_view::npos)
      return ::testing::AssertionFailure() << "message does not mention '" << m << "': " << message;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult throws_error(const std::function<void()>& call, Status status,
                                        const std::vector<std::string>& arguments,
                                        const std::vector<std::string>& mentions) {
  try {
    call();
  } catch (const Error& e) {
    if (e.status() != status)
      return ::testing::AssertionFailure()
             << "status " << static_cast<int>(e.status()) << " instead of "
             << static_cast<int>(status) << ": " << e.what();
    return is_clear_error(e.what(), arguments, mentions);
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-moba exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "the call was accepted";
}

}  // namespace moba::testing
