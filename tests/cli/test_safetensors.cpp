// The .safetensors reader and writer: files as the reference implementation
// writes them, round trips, reading only some tensors, and clear errors for
// malformed or unsupported files.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "errors.hpp"
#include "file_io.hpp"
#include "safetensors.hpp"
#include "temp_dir.hpp"

namespace moba::cli {
namespace {

// A safetensors file: 8-byte little-endian length, `header` verbatim, `data`.
std::vector<unsigned char> st_file(const std::string& header,
                                   const std::vector<unsigned char>& data) {
  std::vector<unsigned char> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<unsigned char>((header.size() >> (8 * i)) & 0xff);
  std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

std::vector<unsigned char> zeros(size_t n) {
  return std::vector<unsigned char>(n, 0);
}

std::map<std::string, Array> parse(const std::vector<unsigned char>& bytes,
                                   const std::vector<std::string>& names) {
  return parse_safetensors(bytes.data(), bytes.size(), names, "t.safetensors");
}

void expect_error(const std::vector<unsigned char>& bytes, const std::vector<std::string>& names,
                  const std::string& fragment) {
  try {
    parse(bytes, names);
    FAIL() << "expected an error containing: " << fragment;
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("t.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, ReadsWhatTheReferenceWriterWrites) {
  // safetensors.numpy.save({'q': a, 'k': a[:1].astype(np.float16)},
  // metadata={'format': 'np'}) with a = arange(6).reshape(2, 3) * 0.5 - 1 in
  // float32: the header, padded to a multiple of 8 with spaces, then k after q.
  const std::string header =
      R"({"__metadata__":{"format":"np"},"q":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("k":{"dtype":"F16","shape":[1,3],"data_offsets":[24,30]}}       )";
  ASSERT_EQ(header.size() % 8, 0u);
  std::vector<unsigned char> data(24);
  const float q[6] = {-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};
  std::memcpy(data.data(), q, 24);
  for (unsigned char b : {0x00, 0xbc, 0x00, 0xb8, 0x00, 0x00}) data.push_back(b);
  const auto bytes = st_file(header, data);
  const SafetensorsHeader h =
      parse_safetensors_header(bytes.data(), bytes.size(), bytes.size(), "t.safetensors");
  EXPECT_EQ(h.metadata.at("format"), "np");
  ASSERT_EQ(h.entries.size(), 2u);
  const auto tensors = parse(bytes, {"q", "k"});
  const Array& aq = tensors.at("q");
  const Array& ak = tensors.at("k");
  EXPECT_EQ(aq.type, ElementType::float32);
  EXPECT_EQ(aq.shape, (std::vector<int64_t>{2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(aq.get(i), q[i]);
  EXPECT_EQ(ak.type, ElementType::float16);
  EXPECT_EQ(ak.shape, (std::vector<int64_t>{1, 3}));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(ak.get(i), q[i]);
}

TEST(Safetensors, RoundTripsAllFloatTypesAndReadsASubset) {
  testing::TempDir dir;
  Array f32(ElementType::float32, {3, 2, 8}), f16(ElementType::float16, {2, 8}),
      bf16(ElementType::bfloat16, {1, 2, 3, 8}), f64(ElementType::float64, {5}),
      empty(ElementType::float32, {0, 4});
  for (Array* a : {&f32, &f16, &bf16, &f64})
    for (int64_t i = 0; i < a->numel(); ++i) a->set(i, 0.125 * static_cast<double>(i) - 1.0);
  const std::string path = dir.file("x.safetensors");
  write_safetensors(
      path, {{"f32", &f32}, {"empty", &empty}, {"f16", &f16}, {"bf16", &bf16}, {"f64", &f64}},
      {{"note", "round trip"}});
  const std::vector<unsigned char> raw = read_file(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | raw[static_cast<size_t>(i)];
  EXPECT_EQ(header_len % 8, 0u) << "data must start 8-byte aligned";

  const auto all = read_safetensors(path, {"f32", "f16", "bf16", "f64", "empty"});
  for (const auto& [name, original] :
       {std::pair{"f32", &f32}, {"f16", &f16}, {"bf16", &bf16}, {"f64", &f64}, {"empty", &empty}}) {
    const Array& back = all.at(name);
    EXPECT_EQ(back.type, original->type) << name;
    EXPECT_EQ(back.shape, original->shape) << name;
    EXPECT_EQ(back.bytes, original->bytes) << name;
  }
  const auto some = read_safetensors(path, {"bf16"});
  EXPECT_EQ(some.size(), 1u);
  EXPECT_EQ(some.at("bf16").bytes, bf16.bytes);
}

TEST(Safetensors, UnsupportedDtypeOnlyMattersWhenRead) {
  // An int64 tensor next to the float ones: validated, but only decoding it fails.
  const std::string header =
      R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"q":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}})";
  const auto bytes = st_file(header, zeros(20));
  EXPECT_EQ(parse(bytes, {"q"}).at("q").numel(), 1);
  expect_error(bytes, {"ids"},
               "tensor 'ids' has unsupported dtype I64; expected F16, BF16, F32 or F64");
}

TEST(Safetensors, MissingTensorListsTheAvailableOnes) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  expect_error(st_file(header, zeros(8)), {"q"}, "no tensor named 'q'; the file holds: a, b");
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string ok_entry = R"("q":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  expect_error({1, 2, 3}, {"q"}, "shorter than its 8-byte header length");
  {
    auto b = st_file("{" + ok_entry + "}", zeros(8));
    b[0] = 0xff;  // header length far beyond the file
    b[1] = 0xff;
    expect_error(b, {"q"}, "exceeds the file size");
  }
  {
    std::vector<unsigned char> b(16, 0);
    b[5] = 0x10;  // 2^44 bytes
    expect_error(b, {"q"}, "exceeds the 100 MB limit");
  }
  expect_error(st_file("{not json", zeros(8)), {"q"}, "not valid JSON");
  expect_error(st_file("[1, 2]", {}), {"q"}, "must be a JSON object");
  expect_error(st_file(R"({"q":{"shape":[2],"data_offsets":[0,8]}})", zeros(8)), {"q"},
               "tensor 'q': missing \"dtype\"");
  expect_error(st_file(R"({"q":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", zeros(8)),
               {"q"}, "unknown dtype \"F33\"");
  expect_error(st_file(R"({"q":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", zeros(8)),
               {"q"}, "must be a non-negative integer");
  expect_error(st_file(R"({"q":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", zeros(8)),
               {"q"}, "data_offsets end (0) < begin (8)");
  expect_error(st_file(R"({"q":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", zeros(8)),
               {"q"}, "span 8 bytes, but shape [3] of F32 needs 12");
  expect_error(st_file(R"({"q":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", zeros(8)), {"q"},
               "\"data_offsets\" must be [begin, end]");
  expect_error(st_file(R"({"__metadata__":{"n":1},)" + ok_entry + "}", zeros(8)), {"q"},
               "\"__metadata__\" value of 'n' must be a string");
}

TEST(Safetensors, RejectsGapsOverlapsAndWrongDataSize) {
  const std::string a = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  expect_error(
      st_file("{" + a + R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", zeros(16)),
      {"a"}, "tensor 'b' starts at data offset 12, expected 8");
  expect_error(
      st_file("{" + a + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", zeros(12)),
      {"a"}, "starts at data offset 4, expected 8");
  expect_error(st_file("{" + a + "}", zeros(6)), {"a"}, "(truncated file)");
  expect_error(st_file("{" + a + "}", zeros(10)), {"a"}, "(trailing bytes)");
}

TEST(Safetensors, TruncatedFileOnDiskIsReported) {
  testing::TempDir dir;
  Array a(ElementType::float32, {16});
  std::vector<unsigned char> bytes = format_safetensors({{"a", &a}});
  bytes.resize(bytes.size() - 4);
  const std::string path = dir.file("cut.safetensors");
  write_file(path, bytes);
  try {
    read_safetensors(path, {"a"});
    FAIL() << "expected an error";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("(truncated file)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moba::cli
