// The .npy reader and writer: files as NumPy writes them, round trips, and a
// clear error for every kind of malformed or unsupported file.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "errors.hpp"
#include "file_io.hpp"
#include "npy.hpp"
#include "temp_dir.hpp"

namespace moba::cli {
namespace {

std::vector<unsigned char> bytes_of(const std::string& s) {
  return {s.begin(), s.end()};
}

// A .npy file: magic, version, header length and `header` verbatim, then `data`.
std::vector<unsigned char> npy_file(const std::string& header,
                                    const std::vector<unsigned char>& data, int major = 1) {
  std::string s = "\x93NUMPY";
  s += static_cast<char>(major);
  s += '\0';
  const size_t n = header.size();
  s += static_cast<char>(n & 0xff);
  s += static_cast<char>((n >> 8) & 0xff);
  if (major > 1) s += std::string("\0\0", 2);
  s += header;
  std::vector<unsigned char> out = bytes_of(s);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<unsigned char> floats(std::initializer_list<float> values) {
  std::vector<unsigned char> out(values.size() * 4);
  std::memcpy(out.data(), std::data(values), out.size());
  return out;
}

Array parse(const std::vector<unsigned char>& bytes) {
  return parse_npy(bytes.data(), bytes.size(), "t.npy");
}

// Expects parse() to throw a FileError whose message holds `fragment`.
void expect_error(const std::vector<unsigned char>& bytes, const std::string& fragment) {
  try {
    parse(bytes);
    FAIL() << "expected an error containing: " << fragment;
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("t.npy"), std::string::npos)
        << "message must name the file: " << e.what();
  }
}

const std::string kHeader23 = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

TEST(Npy, ReadsWhatNumpyWrites) {
  // Header copied from np.save(np.arange(6, dtype='<f4').reshape(2, 3) * 0.5 - 1)
  // with NumPy 2.4: padded with spaces to 128 bytes in all, ending in '\n'.
  std::string header = kHeader23;
  header.append(128 - 10 - header.size() - 1, ' ');
  header += '\n';
  const Array a = parse(npy_file(header, floats({-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f})));
  EXPECT_EQ(a.type, ElementType::float32);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.get(i), -1.0 + 0.5 * i);
}

TEST(Npy, ReadsVersion2HeaderAndFloat16) {
  // np.lib.format.write_array(f, a.astype('<f2'), version=(2, 0)) of the array above.
  const std::vector<unsigned char> data = {0x00, 0xbc, 0x00, 0xb8, 0x00, 0x00,
                                           0x00, 0x38, 0x00, 0x3c, 0x00, 0x3e};
  const Array a =
      parse(npy_file("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }\n", data, 2));
  EXPECT_EQ(a.type, ElementType::float16);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.get(i), -1.0 + 0.5 * i);
}

TEST(Npy, ReadsFloat64AndPython2Longs) {
  std::vector<unsigned char> data(16);
  const double values[2] = {3.25, -7.5};
  std::memcpy(data.data(), values, 16);
  const Array a =
      parse(npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (2L,), }\n", data));
  EXPECT_EQ(a.type, ElementType::float64);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(a.get(0), 3.25);
  EXPECT_EQ(a.get(1), -7.5);
}

TEST(Npy, RoundTripsEveryShapeAndType) {
  testing::TempDir dir;
  const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {0, 2, 8}, {3, 2, 8}, {2, 3, 1, 8}};
  for (ElementType type : {ElementType::float16, ElementType::float32, ElementType::float64}) {
    for (const auto& shape : shapes) {
      Array a(type, shape);
      for (int64_t i = 0; i < a.numel(); ++i) a.set(i, 0.25 * static_cast<double>(i) - 3.0);
      const std::string path = dir.file("a.npy");
      write_npy(path, a);
      const std::vector<unsigned char> raw = read_file(path);
      // NumPy's layout: the data starts at a multiple of 64 bytes.
      EXPECT_EQ((raw.size() - a.bytes.size()) % 64, 0u);
      const Array b = read_npy(path);
      EXPECT_EQ(b.type, type) << shape_string(shape);
      EXPECT_EQ(b.shape, shape);
      EXPECT_EQ(b.bytes, a.bytes) << element_name(type) << " " << shape_string(shape);
    }
  }
}

TEST(Npy, WritesBfloat16AsFloat32) {
  Array a(ElementType::bfloat16, {4});
  for (int i = 0; i < 4; ++i) a.set(i, 1.0 + 1.0 / 128 * i);  // exact in bfloat16
  const std::vector<unsigned char> bytes = format_npy(a);
  const Array b = parse(bytes);
  EXPECT_EQ(b.type, ElementType::float32);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b.get(i), a.get(i));
}

TEST(Npy, HeaderTextMatchesNumpy) {
  Array a(ElementType::float32, {2, 3});
  const std::vector<unsigned char> bytes = format_npy(a);
  const std::string text(bytes.begin() + 10,
                         bytes.begin() + 10 + static_cast<long>(kHeader23.size()));
  EXPECT_EQ(text, kHeader23);
  Array one(ElementType::float16, {7});
  const std::vector<unsigned char> b1 = format_npy(one);
  EXPECT_NE(std::string(b1.begin(), b1.end()).find("'shape': (7,), }"), std::string::npos);
}

TEST(Npy, RejectsMalformedFiles) {
  const auto data6 = floats({0, 0, 0, 0, 0, 0});
  expect_error(bytes_of("PK\x03\x04 not numpy"), "not a .npy file");
  expect_error(bytes_of("\x93NUMPY"), "not a .npy file");
  {
    auto b = npy_file(kHeader23 + "\n", data6);
    b[6] = 9;
    expect_error(b, "unsupported .npy format version 9.0");
  }
  {
    auto b = npy_file(kHeader23 + "\n", {});
    b.resize(20);  // the header is cut short
    expect_error(b, "truncated .npy header");
  }
  expect_error(npy_file("['descr', '<f4']\n", {}), "malformed .npy header");
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3) \n", data6),
               "expected ',' or '}'");
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, }\n", {}), "no 'shape' key");
  expect_error(
      npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1, }\n", data6),
      "unsupported value for 'x'");
  expect_error(
      npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': True, }\n", data6),
      "unexpected key 'x'");
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }\n", data6),
               "expected a non-negative integer");
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': 6, }\n", data6),
               "unsupported value for 'shape'");
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': 'no', 'shape': (6,), }\n", data6),
               "'fortran_order' must be True or False");
  expect_error(
      npy_file("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }\n", data6),
      "structured dtypes are not supported");
}

TEST(Npy, RejectsUnsupportedLayoutsAndTypes) {
  const auto data6 = floats({0, 0, 0, 0, 0, 0});
  expect_error(npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }\n", data6),
               "Fortran-ordered arrays are not supported");
  expect_error(npy_file("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }\n", data6),
               "big-endian dtype '>f4' is not supported");
  expect_error(npy_file("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }\n", data6),
               "unsupported dtype '<i4'");
  expect_error(npy_file("{'descr': '<V2', 'fortran_order': False, 'shape': (2, 3), }\n", {}),
               "NumPy has no bfloat16");
}

TEST(Npy, RejectsWrongDataSize) {
  expect_error(npy_file(kHeader23 + "\n", floats({1, 2, 3, 4, 5})), "(truncated file)");
  expect_error(npy_file(kHeader23 + "\n", floats({1, 2, 3, 4, 5, 6, 7})), "(trailing bytes)");
}

TEST(Npy, MissingFileIsNamed) {
  try {
    read_npy("/nonexistent/dir/q.npy");
    FAIL() << "expected an error";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dir/q.npy: cannot open"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace moba::cli
