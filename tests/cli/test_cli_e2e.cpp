// End-to-end runs of the `moba` binary: its JSON reports parse and hold
// values checked against independent computations, outputs saved to files
// match the library, and bad input gives the documented exit statuses.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "file_io.hpp"
#include "npy.hpp"
#include "safetensors.hpp"
#include "temp_dir.hpp"
#include "workload.hpp"

#ifndef MOBA_CLI_PATH
#error "MOBA_CLI_PATH must name the moba binary"
#endif

namespace moba::cli {
namespace {

using nlohmann::json;

struct Result {
  int status = -1;
  std::string out, err;
};

Result moba(const std::string& args) {
  testing::TempDir dir;
  const std::string err_path = dir.file("stderr.txt");
  const std::string command = std::string(MOBA_CLI_PATH) + " " + args + " 2>" + err_path;
  Result r;
  std::FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) r.out.append(buf, n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  const std::vector<unsigned char> err = read_file(err_path);
  r.err.assign(err.begin(), err.end());
  return r;
}

json parse_json(const Result& r) {
  try {
    return json::parse(r.out);
  } catch (const json::parse_error& e) {
    ADD_FAILURE() << "stdout is not one JSON object: " << e.what() << "\n"
                  << r.out << "\nstderr:\n"
                  << r.err;
    return json::object();
  }
}

// Attended / causal (query, head, key) triples of one sequence of `len`
// tokens, straight from the spec's geometry.
std::pair<int64_t, int64_t> pairs(int64_t len, int64_t heads, int64_t block, int64_t top_k) {
  int64_t attended = 0, causal = 0;
  for (int64_t p = 0; p < len; ++p) {
    const int64_t c = p / block;
    attended += heads * ((std::min(top_k, c + 1) - 1) * block + p - c * block + 1);
    causal += heads * (p + 1);
  }
  return {attended, causal};
}

const std::string kSmall =
    "--tokens 256 --heads-q 2 --heads-kv 1 --head-dim 64 --block-size 32 --no-progress";

TEST(CliRun, JsonReportHasSaneFields) {
  const Result r = moba("run " + kSmall + " --top-k 2 --repeats 2 --warmup 0 --backend cpu --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = parse_json(r);
  EXPECT_EQ(j["command"], "run");
  EXPECT_EQ(j["version"], version());
  EXPECT_EQ(j["backend"], "cpu");
  EXPECT_TRUE(j["device"].is_string());
  const json& c = j["config"];
  EXPECT_EQ(c["total_q"], 256);
  EXPECT_EQ(c["heads_q"], 2);
  EXPECT_EQ(c["block_size"], 32);
  EXPECT_EQ(c["top_k"], 2);
  EXPECT_EQ(c["dense_top_k"], 8);
  EXPECT_EQ(c["dtype"], "float32");
  EXPECT_NEAR(c["softmax_scale"].get<double>(), 0.125, 1e-7);

  const auto [attended, causal] = pairs(256, 2, 32, 2);
  EXPECT_EQ(j["attended_pairs"], attended);
  EXPECT_EQ(j["causal_pairs"], causal);
  const double sparsity = j["sparsity"].get<double>();
  EXPECT_GE(sparsity, 0.0);
  EXPECT_LE(sparsity, 1.0);
  EXPECT_NEAR(sparsity, 1.0 - static_cast<double>(attended) / static_cast<double>(causal), 1e-12);

  const json& fwd = j["timings"]["forward"];
  for (const char* which : {"moba", "dense"}) {
    const json& t = fwd[which];
    EXPECT_EQ(t["samples_ms"].size(), 2u) << which;
    EXPECT_GT(t["median_ms"].get<double>(), 0.0) << which;
    EXPECT_LE(t["min_ms"].get<double>(), t["median_ms"].get<double>());
    EXPECT_NEAR(t["tokens_per_s"].get<double>(), 256.0 / (t["median_ms"].get<double>() / 1000.0),
                1e-6 * t["tokens_per_s"].get<double>());
  }
  EXPECT_GT(fwd["speedup"].get<double>(), 0.0);
  EXPECT_NEAR(fwd["speedup"].get<double>(),
              fwd["dense"]["median_ms"].get<double>() / fwd["moba"]["median_ms"].get<double>(),
              1e-9);
  EXPECT_FALSE(j["timings"].contains("backward"));
}

TEST(CliRun, TopKCoveringAllBlocksIsDense) {
  const Result r = moba("run " + kSmall + " --top-k 8 --repeats 1 --warmup 0 --json --no-dense");
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = parse_json(r);
  EXPECT_EQ(j["sparsity"].get<double>(), 0.0);
  EXPECT_EQ(j["attended_pairs"], j["causal_pairs"]);
  EXPECT_TRUE(j["timings"]["forward"]["dense"].is_null());
  EXPECT_TRUE(j["timings"]["forward"]["speedup"].is_null());
}

TEST(CliRun, VarlenAndBackward) {
  const Result r = moba(
      "run --seqlens 100,0,37 --heads-q 4 --heads-kv 1 --head-dim 64 --block-size 16 --top-k 3 "
      "--dtype bfloat16 --shared-routing --repeats 1 --warmup 0 --backward --json --no-progress");
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = parse_json(r);
  EXPECT_EQ(j["config"]["batch"], 3);
  EXPECT_EQ(j["config"]["seqlens_q"], (std::vector<int64_t>{100, 0, 37}));
  EXPECT_EQ(j["config"]["dtype"], "bfloat16");
  EXPECT_EQ(j["config"]["shared_routing"], true);
  const auto a = pairs(100, 4, 16, 3), b = pairs(37, 4, 16, 3);
  EXPECT_EQ(j["attended_pairs"], a.first + b.first);
  EXPECT_EQ(j["causal_pairs"], a.second + b.second);
  const json& bwd = j["timings"]["backward"];
  EXPECT_GT(bwd["moba"]["median_ms"].get<double>(), 0.0);
  EXPECT_GT(bwd["dense"]["median_ms"].get<double>(), 0.0);
  EXPECT_GT(bwd["speedup"].get<double>(), 0.0);
}

// Writes q, k, v of `w` as .npy files in `dir`.
void save_npy(const testing::TempDir& dir, const Workload& w) {
  write_npy(dir.file("q.npy"), w.q);
  write_npy(dir.file("k.npy"), w.k);
  write_npy(dir.file("v.npy"), w.v);
}

TEST(CliRun, LoadedInputsGiveTheLibrarysOutput) {
  testing::TempDir dir;
  const Workload w = generate_workload({20, 30}, {}, 4, 2, 32, DType::float32, 9, 1);
  save_npy(dir, w);
  const std::string inputs =
      "--q " + dir.file("q.npy") + " --k " + dir.file("k.npy") + " --v " + dir.file("v.npy") +
      " --cu-seqlens 0,20,50 --block-size 8 --top-k 2 --backend reference --repeats 1 "
      "--warmup 0 --no-dense --no-progress --json";
  const Result r = moba("run " + inputs + " --out " + dir.file("out.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(parse_json(r)["config"]["source"], "npy");
  const Result rs = moba("run " + inputs + " --out " + dir.file("out.safetensors"));
  ASSERT_EQ(rs.status, 0) << rs.err;

  // The same problem through the library.
  Array out(ElementType::float32, {50, 4, 32});
  std::vector<float> lse(4 * 50);
  const PlacedWorkload placed = place(w, Placement::host);
  Config config;
  config.block_size = 8;
  config.top_k = 2;
  ExecOptions exec;
  exec.backend = Backend::reference;
  forward(placed.inputs, config, TensorView::contiguous(out.data(), DType::float32, {50, 4, 32}),
          TensorView::contiguous(lse.data(), DType::float32, {4, 50}), exec);

  const Array saved = read_npy(dir.file("out.npy"));
  EXPECT_EQ(saved.shape, out.shape);
  EXPECT_EQ(saved.bytes, out.bytes);
  const auto st = read_safetensors(dir.file("out.safetensors"), {"out", "lse"});
  EXPECT_EQ(st.at("out").bytes, out.bytes);
  EXPECT_EQ(st.at("lse").shape, (std::vector<int64_t>{4, 50}));
  ASSERT_EQ(st.at("lse").bytes.size(), lse.size() * 4);
  EXPECT_EQ(std::memcmp(st.at("lse").bytes.data(), lse.data(), lse.size() * 4), 0);
}

TEST(CliRun, Batched4DSafetensorsInput) {
  testing::TempDir dir;
  const Workload w = generate_workload({16, 16}, {}, 2, 2, 64, DType::bfloat16, 5, 1);
  Array q = w.q, k = w.k, v = w.v;
  q.shape = {2, 16, 2, 64};
  k.shape = v.shape = {2, 16, 2, 64};
  write_safetensors(dir.file("in.safetensors"), {{"query", &q}, {"key", &k}, {"value", &v}});
  const Result r = moba(
      "run --safetensors " + dir.file("in.safetensors") +
      " --q-name query --k-name key --v-name value --block-size 4 --top-k 2 --repeats 1 --warmup 0 "
      "--no-progress --json --out " +
      dir.file("out.npy"));
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = parse_json(r);
  EXPECT_EQ(j["config"]["source"], "safetensors");
  EXPECT_EQ(j["config"]["batch"], 2);
  EXPECT_EQ(j["config"]["dtype"], "bfloat16");
  const Array saved = read_npy(dir.file("out.npy"));
  EXPECT_EQ(saved.type, ElementType::float32) << "npy has no bfloat16";
  EXPECT_EQ(saved.shape, (std::vector<int64_t>{2, 16, 2, 64}));
}

TEST(CliRun, HumanOutputAndProgressStayApart) {
  const Result human = moba("run " + kSmall + " --top-k 2 --repeats 1 --warmup 0");
  ASSERT_EQ(human.status, 0) << human.err;
  EXPECT_NE(human.out.find("sparsity"), std::string::npos) << human.out;
  EXPECT_NE(human.out.find("speedup"), std::string::npos) << human.out;
  EXPECT_EQ(human.err, "");

  const Result r = moba(
      "run --tokens 64 --heads-q 2 --heads-kv 1 --head-dim 64 --block-size 16 --top-k 2 --repeats "
      "1 "
      "--warmup 1 --json --progress");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(parse_json(r)["command"], "run");
  EXPECT_NE(r.err.find("moba forward: warmup 1/1"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("dense forward: repeat 1/1"), std::string::npos) << r.err;
}

TEST(CliCheck, SweepPasses) {
  const Result r = moba("check --cases 5 --json --no-progress");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  const json j = parse_json(r);
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["backend"], "cpu");
  EXPECT_EQ(j["cases"].size(), 5u);
  EXPECT_EQ(j["summary"]["failed"], 0);
  EXPECT_EQ(j["summary"]["selection"]["mismatches"], 0);
  EXPECT_GT(j["summary"]["selection"]["compared"].get<int64_t>(), 0);
  for (const auto& c : j["cases"]) {
    EXPECT_LE(c["out"]["max_abs"].get<double>(), c["out"]["tolerance"].get<double>());
    EXPECT_EQ(c["ok"], true);
  }

  const Result b = moba("check --cases 3 --backward --seed 7 --no-progress");
  ASSERT_EQ(b.status, 0) << b.out << b.err;
  EXPECT_NE(b.out.find("PASS: 3/3"), std::string::npos) << b.out;
}

TEST(CliRouting, JsonMatchesTheLibrary) {
  testing::TempDir dir;
  const Workload w = generate_workload({13, 0, 21}, {}, 2, 1, 16, DType::float16, 3, 1);
  save_npy(dir, w);
  const Result r =
      moba("routing --q " + dir.file("q.npy") + " --k " + dir.file("k.npy") + " --v " +
           dir.file("v.npy") +
           " --cu-seqlens 0,13,13,34 --block-size 4 --top-k 3 --backend reference --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = parse_json(r);

  Config config;
  config.block_size = 4;
  config.top_k = 3;
  const int64_t width = routing_width(21, config);
  std::vector<int32_t> expected(static_cast<size_t>(34 * 2 * width));
  ExecOptions exec;
  exec.backend = Backend::reference;
  routing(place(w, Placement::host).inputs, config,
          TensorView::contiguous(expected.data(), DType::int32, {34, 2, width}), exec);

  ASSERT_EQ(j["sequences"].size(), 3u);
  int64_t row = 0;
  for (const auto& seq : j["sequences"]) {
    for (const auto& q : seq["queries"]) {
      for (int64_t h = 0; h < 2; ++h) {
        std::vector<int32_t> want;
        for (int64_t m = 0; m < width; ++m) {
          const int32_t b = expected[static_cast<size_t>((row * 2 + h) * width + m)];
          if (b >= 0) want.push_back(b);
        }
        EXPECT_EQ(q["selected"][static_cast<size_t>(h)].get<std::vector<int32_t>>(), want)
            << "row " << row;
      }
      ++row;
    }
  }
  EXPECT_EQ(row, 34);
}

TEST(CliInfo, ListsBackends) {
  const Result r = moba("info --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = parse_json(r);
  EXPECT_EQ(j["version"], version());
  EXPECT_EQ(j["backends"]["reference"], true);
  EXPECT_EQ(j["backends"]["cpu"], true);
  EXPECT_EQ(j["backends"]["cuda"], backend_available(Backend::cuda));
  EXPECT_GE(j["hardware_threads"].get<int>(), 1);
  const Result human = moba("info");
  EXPECT_NE(human.out.find(std::string("moba ") + version()), std::string::npos);
}

void expect_failure(const std::string& args, int status, const std::string& fragment) {
  const Result r = moba(args);
  EXPECT_EQ(r.status, status) << args << "\n" << r.err;
  EXPECT_EQ(r.err.rfind("moba: ", 0), 0u) << "errors start with 'moba: ': " << r.err;
  EXPECT_NE(r.err.find(fragment), std::string::npos) << args << "\n" << r.err;
  EXPECT_EQ(r.out, "") << "nothing on stdout on error";
}

TEST(CliErrors, BadArgumentsExitWithStatus2) {
  expect_failure("run --block-size 0 --json", 2, "block_size");
  expect_failure("run --tokens 64 --top-k 0", 2, "top_k");
  expect_failure("run --dtype half", 2, "--dtype: unknown dtype 'half'");
  expect_failure("run --backend gpu", 2, "--backend: unknown backend 'gpu'");
  expect_failure("run --tokens 8 --q q.npy --k k.npy --v v.npy", 2, "--tokens excludes --q");
  expect_failure("run --tokens 64 --head-dim 12", 2, "head dim 12");
  expect_failure("run --tokens 64 --heads-q 3 --heads-kv 2", 2, "multiple of k's heads");
  expect_failure("run --repeats 0", 2, "--repeats");
  expect_failure("run --softmax-scale 0", 2, "--softmax-scale");
  expect_failure("check --cases 0", 2, "--cases");
  expect_failure("frobnicate", 2, "frobnicate");
  expect_failure("", 2, "subcommand");
}

TEST(CliErrors, UnreadableInputsExitWithStatus1) {
  testing::TempDir dir;
  const std::string missing = dir.file("missing.npy");
  expect_failure("run --q " + missing + " --k " + missing + " --v " + missing, 1,
                 missing + ": cannot open");
  write_file(dir.file("bad.npy"), {'n', 'o', 't', ' ', 'n', 'p', 'y'});
  const std::string bad = dir.file("bad.npy");
  expect_failure("run --q " + bad + " --k " + bad + " --v " + bad, 1, bad + ": not a .npy file");
  expect_failure("run --safetensors " + bad, 1, "not a safetensors file");
  if (!backend_available(Backend::cuda))
    expect_failure("run --tokens 64 --backend cuda", 1, "backend cuda");
}

TEST(CliHelp, HelpAndVersionSucceed) {
  const Result help = moba("--help");
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("routing"), std::string::npos);
  const Result run_help = moba("run --help");
  EXPECT_EQ(run_help.status, 0);
  EXPECT_NE(run_help.out.find("--block-size"), std::string::npos) << run_help.out;
  const Result v = moba("--version");
  EXPECT_EQ(v.status, 0);
  EXPECT_NE(v.out.find(version()), std::string::npos);
}

}  // namespace
}  // namespace moba::cli
