#include "check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "common.hpp"
#include "core/dtype.hpp"
#include "core/routing.hpp"
#include "errors.hpp"

namespace moba::cli {
namespace {

using json = nlohmann::ordered_json;
constexpr DType f32 = DType::float32, f16 = DType::float16, bf16 = DType::bfloat16;

// Hand-picked so that even the first few cases cover every dtype, GQA ratio
// and head dim, and together the edge cases the spec pins down. Shapes stay
// small: the reference backend is O(n^2) loops in fp64.
const std::vector<CheckCase>& builtin_cases() {
  static const std::vector<CheckCase> cases = {
      {{128}, {}, 4, 1, 64, 16, 3, f32, false, {}},            // GQA 4, several blocks
      {{37, 0, 1, 64}, {}, 8, 1, 128, 16, 2, f16, false, {}},  // varlen: empty and length-1
                                                               // sequences, GQA 8
      {{100}, {}, 2, 2, 64, 32, 2, bf16, false, {}},           // partial last block, MHA
      {{96, 50}, {}, 4, 4, 64, 16, 1, f32, false, {}},         // top-k 1: the current block only
      {{70, 33}, {}, 8, 2, 128, 8, 100, f16, false, {}},       // top-k >= blocks: dense causal
      {{1, 1}, {150, 77}, 8, 1, 128, 16, 3, bf16, false, {}},  // decode: one query at the end of
                                                               // the keys
      {{20}, {130}, 4, 1, 64, 32, 2, f32, false, {}},          // chunked prefill
      {{120}, {}, 8, 1, 64, 16, 3, f16, true, {}},             // GQA-shared routing
      {{40}, {}, 2, 1, 64, 1, 4, bf16, false, {}},             // block size 1
      {{50}, {}, 4, 4, 128, 64, 2, f32, false, {}},            // one block longer than the sequence
      {{1, 2, 3, 0, 17, 33}, {}, 4, 1, 64, 4, 3, f16, false, {}},
      {{200}, {}, 8, 8, 64, 16, 5, bf16, false, {}},
      {{64}, {}, 2, 1, 64, 8, 2, f32, false, 0.5f},  // explicit softmax scale
      {{0, 5, 0}, {}, 4, 4, 64, 2, 2, f16, false, {}},
      {{130}, {}, 8, 1, 128, 64, 2, bf16, true, {}},
      {{160, 3}, {}, 8, 2, 128, 32, 4, f32, true, {}},
      {{0}, {}, 2, 1, 64, 16, 2, f16, false, {}},            // nothing to compute
      {{90}, {}, 4, 1, 128, 7, 3, bf16, false, {}},          // block size not a power of two
      {{5, 0}, {100, 40}, 4, 2, 64, 16, 2, f32, false, {}},  // keys without queries
      {{256}, {}, 2, 2, 64, 64, 2, f16, false, {}},
      {{48, 48}, {}, 16, 2, 64, 8, 3, bf16, false, {}},
      {{77}, {}, 8, 8, 128, 10, 1000, f32, false, {}},
      {{33, 1, 65}, {}, 4, 1, 64, 32, 1, f16, true, {}},
      {{180}, {}, 8, 1, 64, 12, 4, bf16, false, {}},
  };
  return cases;
}

CheckCase random_shape(std::mt19937_64& rng, int index) {
  const auto pick = [&](std::initializer_list<int64_t> values) {
    return *(values.begin() + std::uniform_int_distribution<size_t>(0, values.size() - 1)(rng));
  };
  CheckCase c;
  c.dtype = std::array{f32, f16, bf16}[static_cast<size_t>(index % 3)];
  const int64_t batch = std::uniform_int_distribution<int64_t>(1, 4)(rng);
  for (int64_t b = 0; b < batch; ++b) {
    const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
    c.lens_q.push_back(kind == 0   ? 0
                       : kind == 1 ? 1
                                   : std::uniform_int_distribution<int64_t>(2, 160)(rng));
  }
  if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) {  // decode / chunked prefill
    c.lens_k = c.lens_q;
    for (auto& l : c.lens_q) l = std::uniform_int_distribution<int64_t>(0, l)(rng);
  }
  c.heads_kv = pick({1, 2});
  c.heads_q = c.heads_kv * pick({1, 4, 8});
  c.head_dim = pick({64, 128});
  c.block_size = pick({1, 3, 8, 16, 32, 64});
  c.top_k = pick({1, 2, 3, 5, 1000});
  c.shared_routing = std::uniform_int_distribution<int>(0, 3)(rng) == 0;
  return c;
}

Config config_of(const CheckCase& c) {
  Config config;
  config.block_size = c.block_size;
  config.top_k = c.top_k;
  config.softmax_scale = c.softmax_scale;
  config.gqa_shared_routing = c.shared_routing;
  return config;
}

Workload case_workload(const CheckCase& c, uint64_t seed) {
  return generate_workload(c.lens_q, c.lens_k, c.heads_q, c.heads_kv, c.head_dim, c.dtype, seed, 1);
}

// Position and current block of each query row.
struct RowInfo {
  int64_t seq = 0;
  int64_t pos = 0;
};

std::vector<RowInfo> row_info(const Workload& w) {
  std::vector<RowInfo> rows(static_cast<size_t>(w.total_q));
  for (int64_t b = 0; b < w.batch(); ++b) {
    const int64_t len_q = w.cu_q[b + 1] - w.cu_q[b], len_k = w.cu_k[b + 1] - w.cu_k[b];
    for (int64_t i = 0; i < len_q; ++i)
      rows[static_cast<size_t>(w.cu_q[b] + i)] = RowInfo{b, len_k - len_q + i};
  }
  return rows;
}

// Whether `candidate` is an acceptable selection for the query at `row`,
// `head`: a valid set of the right size whose blocks all score within the
// accumulation error bound of every past block it left out.
bool is_near_tie(const CheckCase& c, const Workload& w, const RowInfo& info, int64_t row,
                 int64_t head, const int32_t* reference, const int32_t* candidate, int64_t width) {
  const int64_t current = info.pos / c.block_size;
  int64_t ref_count = 0, cand_count = 0;
  while (ref_count < width && reference[ref_count] >= 0) ++ref_count;
  std::vector<bool> chosen(static_cast<size_t>(current + 1), false);
  int64_t previous = -1;
  for (; cand_count < width && candidate[cand_count] >= 0; ++cand_count) {
    const int64_t j = candidate[cand_count];
    if (j <= previous || j > current) return false;
    chosen[static_cast<size_t>(j)] = true;
    previous = j;
  }
  if (cand_count != ref_count || previous != current) return false;

  // Gate scores as the spec defines them (block means rounded to k's dtype),
  // in fp64, with the magnitude sum_c |q_c kbar_c| that bounds fp32 error.
  const int64_t group = c.heads_q / c.heads_kv;
  const int64_t kvh = head / group;
  const int64_t first = c.shared_routing ? kvh * group : head;
  const int64_t last = c.shared_routing ? first + group : head + 1;
  const int64_t len_k = w.cu_k[info.seq + 1] - w.cu_k[info.seq];
  const int64_t k0 = w.cu_k[info.seq];
  const int64_t d = c.head_dim;
  std::vector<double> score(static_cast<size_t>(current), 0.0),
      magnitude(static_cast<size_t>(current), 0.0);
  std::vector<double> mean(static_cast<size_t>(d));
  for (int64_t j = 0; j < current; ++j) {
    const int64_t begin = j * c.block_size, end = std::min(begin + c.block_size, len_k);
    for (int64_t x = 0; x < d; ++x) {
      double sum = 0.0;
      for (int64_t t = begin; t < end; ++t) sum += w.k.get(((k0 + t) * c.heads_kv + kvh) * d + x);
      mean[static_cast<size_t>(x)] =
          core::round_to(c.dtype, static_cast<float>(sum / static_cast<double>(end - begin)));
    }
    for (int64_t h = first; h < last; ++h)
      for (int64_t x = 0; x < d; ++x) {
        const double term = w.q.get((row * c.heads_q + h) * d + x) * mean[static_cast<size_t>(x)];
        score[static_cast<size_t>(j)] += term;
        magnitude[static_cast<size_t>(j)] += std::abs(term);
      }
  }
  constexpr double kRelativeNoise = 1e-5;
  double worst_chosen = INFINITY, best_left_out = -INFINITY;
  for (int64_t j = 0; j < current; ++j) {
    const double slack = kRelativeNoise * magnitude[static_cast<size_t>(j)];
    if (chosen[static_cast<size_t>(j)])
      worst_chosen = std::min(worst_chosen, score[static_cast<size_t>(j)] + slack);
    else
      best_left_out = std::max(best_left_out, score[static_cast<size_t>(j)] - slack);
  }
  return worst_chosen >= best_left_out;
}

// Element-wise comparison, leaving out the elements whose (row, head) pair is
// marked in `skip`.
// `group` consecutive elements share one entry of `skip`.
TensorError compare_rows(const std::vector<double>& actual, const std::vector<double>& expected,
                         int64_t group, const std::vector<bool>* skip, double tolerance) {
  TensorError e;
  double sum = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (skip && (*skip)[i / static_cast<size_t>(group)]) continue;
    if (!std::isfinite(actual[i])) e.finite = false;
    const double diff = std::abs(actual[i] - expected[i]);
    e.max_abs = std::max(e.max_abs, diff);
    e.max_ref = std::max(e.max_ref, std::abs(expected[i]));
    sum += diff;
    ++e.compared;
  }
  if (!e.finite) e.max_abs = INFINITY;
  e.mean_abs = e.compared ? sum / static_cast<double>(e.compared) : 0.0;
  e.tolerance = tolerance * std::max(1.0, e.max_ref);
  return e;
}

std::vector<double> to_double(const Array& a) {
  std::vector<double> v(static_cast<size_t>(a.numel()));
  for (int64_t i = 0; i < a.numel(); ++i) v[static_cast<size_t>(i)] = a.get(i);
  return v;
}

json error_json(const TensorError& e) {
  // JSON has no infinity: a non-finite result reads max_abs null, finite false.
  return {{"max_abs", e.finite ? json(e.max_abs) : json(nullptr)},
          {"finite", e.finite},
          {"mean_abs", e.mean_abs},
          {"max_ref", e.max_ref},
          {"tolerance", e.tolerance},
          {"compared", e.compared},
          {"enforced", e.enforced},
          {"ok", e.ok()}};
}

// Overall statistics of one tensor over all cases.
struct Overall {
  double max_abs = 0.0, sum_abs = 0.0;
  int64_t compared = 0;
  void add(const TensorError& e) {
    max_abs = std::max(max_abs, e.max_abs);
    sum_abs += e.mean_abs * static_cast<double>(e.compared);
    compared += e.compared;
  }
  double mean_abs() const { return compared ? sum_abs / static_cast<double>(compared) : 0.0; }
};

}  // namespace

int builtin_case_count() {
  return static_cast<int>(builtin_cases().size());
}

std::vector<CheckCase> check_cases(int count, uint64_t seed) {
  std::vector<CheckCase> cases;
  const auto& builtin = builtin_cases();
  std::mt19937_64 rng(seed ^ 0x5eedc0de5eedc0deull);
  for (int i = 0; i < count; ++i)
    cases.push_back(static_cast<size_t>(i) < builtin.size() ? builtin[static_cast<size_t>(i)]
                                                            : random_shape(rng, i));
  return cases;
}

std::string describe(const CheckCase& c) {
  const auto list = [](const std::vector<int64_t>& v) {
    std::string s = "[";
    s += join(v, ",");
    s += ']';
    return s;
  };
  std::string s = "lens=" + list(c.lens_q);
  if (!c.lens_k.empty()) s += " lens_k=" + list(c.lens_k);
  s += " Hq=" + std::to_string(c.heads_q) + " Hkv=" + std::to_string(c.heads_kv) +
       " D=" + std::to_string(c.head_dim) + " B=" + std::to_string(c.block_size) +
       " K=" + std::to_string(c.top_k);
  if (c.shared_routing) s += " shared";
  if (c.softmax_scale) {
    char buf[32];
    std::snprintf(buf, sizeof buf, " scale=%g", static_cast<double>(*c.softmax_scale));
    s += buf;
  }
  return s;
}

Tolerances tolerances(DType dtype) {
  switch (dtype) {
    case DType::float16:
      return {4e-3, 1e-4, 8e-3};
    case DType::bfloat16:
      return {3e-2, 1e-4, 6e-2};
    default:
      return {2e-5, 2e-5, 4e-5};
  }
}

BackendResult run_backend(const CheckCase& c, const Workload& w, const Array* dout, Backend backend,
                          int threads) {
  const Placement placement = placement_for(backend);
  const Config config = config_of(c);
  ExecOptions exec;
  exec.backend = backend;
  exec.num_threads = threads;
  const PlacedWorkload placed = place(w, placement);
  const int64_t tq = w.total_q, tk = w.total_k, hq = c.heads_q, hkv = c.heads_kv, d = c.head_dim;

  BackendResult r;
  r.width = std::max<int64_t>(routing_width(w.max_len_k, config), 1);
  const PlacedTensor out = make_tensor(placement, c.dtype, {tq, hq, d});
  const PlacedTensor lse = make_tensor(placement, DType::float32, {hq, tq});
  const PlacedTensor selected = make_tensor(placement, DType::int32, {tq, hq, r.width});
  forward(placed.inputs, config, out.view, lse.view, exec);
  routing(placed.inputs, config, selected.view, exec);
  r.out = download(out, element_type(c.dtype), {tq, hq, d});
  r.lse.resize(static_cast<size_t>(hq * tq));
  lse.buffer.download(r.lse.data(), r.lse.size() * sizeof(float));
  r.selected.resize(static_cast<size_t>(tq * hq * r.width));
  selected.buffer.download(r.selected.data(), r.selected.size() * sizeof(int32_t));
  if (dout) {
    const PlacedTensor dout_placed = place_array(placement, *dout, c.dtype, {tq, hq, d});
    const PlacedTensor dq = make_tensor(placement, c.dtype, {tq, hq, d});
    const PlacedTensor dk = make_tensor(placement, c.dtype, {tk, hkv, d});
    const PlacedTensor dv = make_tensor(placement, c.dtype, {tk, hkv, d});
    backward(placed.inputs, config, out.view, dout_placed.view, lse.view, dq.view, dk.view, dv.view,
             exec);
    r.dq = download(dq, element_type(c.dtype), {tq, hq, d});
    r.dk = download(dk, element_type(c.dtype), {tk, hkv, d});
    r.dv = download(dv, element_type(c.dtype), {tk, hkv, d});
  }
  return r;
}

bool CaseReport::ok() const {
  if (!out.ok() || !lse.ok() || selection.mismatches != 0) return false;
  for (const auto* g : {&dq, &dk, &dv})
    if (*g && !(*g)->ok()) return false;
  return true;
}

CaseReport judge(const CheckCase& c, const Workload& w, const BackendResult& ref,
                 const BackendResult& cand) {
  CaseReport report;
  const int64_t hq = c.heads_q, d = c.head_dim, width = ref.width;
  const std::vector<RowInfo> rows = row_info(w);
  std::vector<bool> skip(static_cast<size_t>(w.total_q * hq), false);
  for (int64_t row = 0; row < w.total_q; ++row)
    for (int64_t h = 0; h < hq; ++h) {
      const size_t at = static_cast<size_t>(row * hq + h);
      const int32_t* a = ref.selected.data() + at * static_cast<size_t>(width);
      const int32_t* b = cand.selected.data() + at * static_cast<size_t>(cand.width);
      ++report.selection.compared;
      if (cand.width == width && std::equal(a, a + width, b)) {
        ++report.selection.agree;
      } else if (cand.width == width &&
                 is_near_tie(c, w, rows[static_cast<size_t>(row)], row, h, a, b, width)) {
        ++report.selection.near_ties;
        skip[at] = true;
      } else {
        ++report.selection.mismatches;
      }
    }

  const Tolerances tol = tolerances(c.dtype);
  report.out = compare_rows(to_double(cand.out), to_double(ref.out), d, &skip, tol.out);
  // lse is [Hq, total_q]: transpose the skip mask to its layout.
  std::vector<bool> skip_lse(skip.size());
  for (int64_t row = 0; row < w.total_q; ++row)
    for (int64_t h = 0; h < hq; ++h)
      skip_lse[static_cast<size_t>(h * w.total_q + row)] = skip[static_cast<size_t>(row * hq + h)];
  report.lse =
      compare_rows(std::vector<double>(cand.lse.begin(), cand.lse.end()),
                   std::vector<double>(ref.lse.begin(), ref.lse.end()), 1, &skip_lse, tol.lse);
  if (ref.dq && cand.dq) {
    report.dq = compare_rows(to_double(*cand.dq), to_double(*ref.dq), d, &skip, tol.grad);
    report.dk = compare_rows(to_double(*cand.dk), to_double(*ref.dk), d, nullptr, tol.grad);
    report.dv = compare_rows(to_double(*cand.dv), to_double(*ref.dv), d, nullptr, tol.grad);
    // A tie routed differently moves whole blocks of key gradients.
    report.dk->enforced = report.dv->enforced = report.selection.near_ties == 0;
  }
  return report;
}

int check_command(const CheckOptions& o, std::ostream& out) {
  if (o.cases < 1) throw UsageError("--cases: expected >= 1, got " + std::to_string(o.cases));
  if (o.threads < 0) throw UsageError("--threads: expected >= 0, got " + std::to_string(o.threads));
  const Backend backend = resolve_backend(o.backend);
  const std::vector<CheckCase> cases = check_cases(o.cases, o.seed);
  Progress progress(o.progress, static_cast<int64_t>(cases.size()));

  json case_reports = json::array();
  Overall overall_out, overall_lse, overall_dq, overall_dk, overall_dv;
  SelectionStats overall_sel;
  int failed = 0, skipped = 0;
  std::vector<std::string> lines;
  for (size_t i = 0; i < cases.size(); ++i) {
    const CheckCase& c = cases[i];
    progress.step("case " + std::to_string(i + 1) + "/" + std::to_string(cases.size()));
    const uint64_t case_seed = o.seed * 1000003ull + i;
    const Workload w = case_workload(c, case_seed);
    std::optional<Array> dout;
    if (o.backward) {
      dout.emplace(element_type(c.dtype), std::vector<int64_t>{w.total_q, c.heads_q, c.head_dim});
      fill_normal(*dout, case_seed, 3, 1);
    }
    const BackendResult ref = run_backend(c, w, dout ? &*dout : nullptr, Backend::reference, 1);
    // What a backend documents as unsupported (a dtype, the backward pass) is
    // skipped and reported, not failed; any other error still aborts.
    BackendResult cand;
    std::string skip_reason, gradients_skipped;
    try {
      cand = run_backend(c, w, dout ? &*dout : nullptr, backend, o.threads);
    } catch (const Error& e) {
      if (e.status() != Status::unsupported) throw;
      skip_reason = e.what();
    }
    if (!skip_reason.empty() && dout) {
      try {
        cand = run_backend(c, w, nullptr, backend, o.threads);
        gradients_skipped = skip_reason;
        skip_reason.clear();
      } catch (const Error& e) {
        if (e.status() != Status::unsupported) throw;
      }
    }
    if (!skip_reason.empty()) {
      ++skipped;
      case_reports.push_back({{"index", i},
                              {"description", describe(c)},
                              {"dtype", dtype_name(c.dtype)},
                              {"ok", true},
                              {"skipped", skip_reason}});
      char line[512];
      std::snprintf(line, sizeof line, "%3zu %-4s %-8s %-52s %s", i + 1, "skip",
                    dtype_name(c.dtype), describe(c).c_str(), skip_reason.c_str());
      lines.push_back(line);
      continue;
    }
    const CaseReport r = judge(c, w, ref, cand);
    if (!r.ok()) ++failed;
    overall_out.add(r.out);
    overall_lse.add(r.lse);
    if (r.dq) {
      overall_dq.add(*r.dq);
      overall_dk.add(*r.dk);
      overall_dv.add(*r.dv);
    }
    overall_sel.compared += r.selection.compared;
    overall_sel.agree += r.selection.agree;
    overall_sel.near_ties += r.selection.near_ties;
    overall_sel.mismatches += r.selection.mismatches;

    json entry = {{"index", i},
                  {"description", describe(c)},
                  {"dtype", dtype_name(c.dtype)},
                  {"ok", r.ok()},
                  {"out", error_json(r.out)},
                  {"lse", error_json(r.lse)},
                  {"selection",
                   {{"compared", r.selection.compared},
                    {"agree", r.selection.agree},
                    {"agreement", r.selection.agreement()},
                    {"near_ties", r.selection.near_ties},
                    {"mismatches", r.selection.mismatches}}}};
    if (r.dq) {
      entry["dq"] = error_json(*r.dq);
      entry["dk"] = error_json(*r.dk);
      entry["dv"] = error_json(*r.dv);
    }
    if (!gradients_skipped.empty()) entry["gradients_skipped"] = gradients_skipped;
    case_reports.push_back(entry);

    char line[512];
    std::snprintf(line, sizeof line, "%3zu %-4s %-8s %-52s out %.1e/%.1e  lse %.1e/%.1e", i + 1,
                  r.ok() ? "ok" : "FAIL", dtype_name(c.dtype), describe(c).c_str(), r.out.max_abs,
                  r.out.tolerance, r.lse.max_abs, r.lse.tolerance);
    std::string text = line;
    if (r.dq) {
      // The gradient closest to (or furthest beyond) its tolerance.
      const TensorError* worst = &*r.dq;
      for (const TensorError* g : {&*r.dk, &*r.dv})
        if (g->max_abs * worst->tolerance > worst->max_abs * g->tolerance) worst = g;
      const char* name = worst == &*r.dq ? "dq" : worst == &*r.dk ? "dk" : "dv";
      std::snprintf(line, sizeof line, "  %s %.1e/%.1e", name, worst->max_abs, worst->tolerance);
      text += line;
    }
    std::snprintf(line, sizeof line, "  selection %.2f%%", 100.0 * r.selection.agreement());
    text += line;
    if (r.selection.near_ties) text += " (" + std::to_string(r.selection.near_ties) + " near ties)";
    if (!gradients_skipped.empty()) text += "  (gradients skipped: unsupported)";
    if (r.selection.mismatches)
      text += " (" + std::to_string(r.selection.mismatches) + " MISMATCHES)";
    lines.push_back(text);
  }
  progress.finish();

  // Nothing compared is no evidence of correctness.
  const bool ok = failed == 0 && skipped < static_cast<int>(cases.size());
  if (o.json) {
    const auto overall_json = [](const Overall& v) {
      return json{{"max_abs", v.max_abs}, {"mean_abs", v.mean_abs()}};
    };
    json summary = {{"cases", cases.size()},
                    {"failed", failed},
                    {"skipped", skipped},
                    {"out", overall_json(overall_out)},
                    {"lse", overall_json(overall_lse)},
                    {"selection",
                     {{"compared", overall_sel.compared},
                      {"agree", overall_sel.agree},
                      {"agreement", overall_sel.agreement()},
                      {"near_ties", overall_sel.near_ties},
                      {"mismatches", overall_sel.mismatches}}}};
    if (overall_dq.compared > 0) {  // only when some backend computed gradients
      summary["dq"] = overall_json(overall_dq);
      summary["dk"] = overall_json(overall_dk);
      summary["dv"] = overall_json(overall_dv);
    }
    const json report = {{"command", "check"},
                         {"version", version()},
                         {"backend", backend_name(backend)},
                         {"reference", "reference"},
                         {"seed", o.seed},
                         {"backward", o.backward},
                         {"ok", ok},
                         {"summary", summary},
                         {"cases", case_reports}};
    out << report.dump(2) << '\n';
    return ok ? 0 : 1;
  }
  out << "moba " << version() << " check: backend " << backend_name(backend)
      << " against reference, " << cases.size() << " cases, seed " << o.seed
      << (o.backward ? ", forward and backward" : ", forward") << '\n'
      << "  errors are max abs / tolerance\n";
  for (const auto& l : lines) out << l << '\n';
  char line[256];
  std::snprintf(line, sizeof line, "overall: out max %.2e mean %.2e, lse max %.2e mean %.2e",
                overall_out.max_abs, overall_out.mean_abs(), overall_lse.max_abs,
                overall_lse.mean_abs());
  out << line;
  if (overall_dq.compared > 0) {
    std::snprintf(line, sizeof line, ", dq max %.2e, dk max %.2e, dv max %.2e", overall_dq.max_abs,
                  overall_dk.max_abs, overall_dv.max_abs);
    out << line;
  }
  std::snprintf(
      line, sizeof line,
      "\nselection: %.4f%% of %lld (query, head) agree, %lld near ties, %lld mismatches\n",
      100.0 * overall_sel.agreement(), static_cast<long long>(overall_sel.compared),
      static_cast<long long>(overall_sel.near_ties),
      static_cast<long long>(overall_sel.mismatches));
  out << line;
  out << (ok ? "PASS" : "FAIL") << ": " << (cases.size() - static_cast<size_t>(failed + skipped))
      << "/" << (cases.size() - static_cast<size_t>(skipped)) << " cases within tolerance";
  if (skipped) out << " (" << skipped << " skipped as unsupported by the backend)";
  out << '\n';
  return ok ? 0 : 1;
}

}  // namespace moba::cli
