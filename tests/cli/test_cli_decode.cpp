// End-to-end `moba run --decode`: the JSON report parses, the K/V bytes each
// step reads match the spec's geometry computed here, and bad arguments exit
// with status 2.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#ifndef MOBA_CLI_PATH
#error "MOBA_CLI_PATH must name the moba binary"
#endif

namespace {

struct Result {
  int status = -1;
  std::string out;
};

Result moba(const std::string& args) {
  const std::string command = std::string(MOBA_CLI_PATH) + " " + args + " 2>/dev/null";
  Result r;
  std::FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) r.out.append(buf, n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Keys one kv group reads for its newest query at length `len` with shared
// routing: top_k - 1 full past blocks (or all) plus its current block so far.
int64_t keys_read(int64_t len, int64_t block, int64_t top_k) {
  const int64_t current = (len - 1) / block;
  return std::min(top_k - 1, current) * block + (len - current * block);
}

TEST(CliDecode, JsonReportsBytesOfTheSpecsGeometry) {
  // Shared routing: every kv group selects exactly min(top_k, blocks) blocks.
  const Result r = moba(
      "run --decode --seqlens 300,0,77 --heads-q 4 --heads-kv 2 --head-dim 32 --block-size 32 "
      "--top-k 3 --shared-routing --decode-steps 2 --warmup 1 --json --threads 2");
  ASSERT_EQ(r.status, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["command"], "run --decode");
  EXPECT_EQ(j["config"]["batch"], 3);
  // After 1 warmup + 2 timed steps every sequence has grown by 3 tokens.
  const int64_t row_bytes = 2 /* heads_kv */ * 32 * 4 /* float32 */ * 2 /* k and v */;
  int64_t moba = 0, dense = 0;
  for (int64_t len : {303, 3, 80}) {
    moba += keys_read(len, 32, 3) * row_bytes;
    dense += len * row_bytes;
  }
  EXPECT_EQ(j["moba_bytes_read"].get<int64_t>(), moba);
  EXPECT_EQ(j["dense_bytes_read"].get<int64_t>(), dense);
  EXPECT_GT(j["moba_decode_ms"].get<double>(), 0.0);
  EXPECT_GT(j["dense_decode_ms"].get<double>(), 0.0);
  EXPECT_GT(j["speedup"].get<double>(), 0.0);
}

TEST(CliDecode, HumanReportAndErrors) {
  const Result r = moba("run --decode --tokens 256 --block-size 64 --top-k 2 --decode-steps 2");
  ASSERT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("speedup"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("GB/s"), std::string::npos) << r.out;
  EXPECT_EQ(moba("run --decode --decode-steps 0").status, 2);
  EXPECT_EQ(moba("run --decode --tokens 64 --top-k 0").status, 2);
}

}  // namespace
