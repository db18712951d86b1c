#include "npy.hpp"

#include <cctype>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <string_view>

#include "errors.hpp"
#include "file_io.hpp"

namespace moba::cli {
namespace {

constexpr std::string_view kMagic = "\x93NUMPY";

// One value of the header dict: a string, a bool or a tuple of integers —
// everything NumPy writes for a non-structured dtype.
struct Value {
  enum class Kind { string, boolean, tuple } kind = Kind::string;
  std::string text;
  bool flag = false;
  std::vector<int64_t> ints;
};

// A recursive-descent parser of the header's dict literal.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  std::map<std::string, Value> parse_dict() {
    std::map<std::string, Value> dict;
    skip_space();
    expect('{');
    for (;;) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = parse_string();
      skip_space();
      expect(':');
      skip_space();
      Value value = parse_value(key);
      if (!dict.emplace(key, std::move(value)).second) fail("duplicate key '" + key + "'");
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != '}') fail("expected ',' or '}' after the value of '" + key + "'");
    }
    ++pos_;
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the header dict");
    return dict;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw FileError(source_ + ": malformed .npy header (" + what + " at character " +
                    std::to_string(pos_) + "): " + std::string(text_));
  }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  bool consume_word(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  std::string parse_string() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("expected a quoted string");
    ++pos_;
    std::string s;
    while (peek() != quote) {
      if (pos_ >= text_.size()) fail("unterminated string");
      if (peek() == '\\') fail("escape sequences are not supported in strings");
      s += text_[pos_++];
    }
    ++pos_;
    return s;
  }

  int64_t parse_int() {
    if (!std::isdigit(static_cast<unsigned char>(peek()))) fail("expected a non-negative integer");
    int64_t v = 0;
    while (std::isdigit(static_cast<unsigned char>(peek()))) {
      const int digit = text_[pos_++] - '0';
      if (v > (std::numeric_limits<int64_t>::max() - digit) / 10) fail("integer too large");
      v = v * 10 + digit;
    }
    if (peek() == 'L') ++pos_;  // Python 2 long literal, written by old NumPy
    return v;
  }

  Value parse_value(const std::string& key) {
    Value v;
    const char c = peek();
    if (c == '\'' || c == '"') {
      v.kind = Value::Kind::string;
      v.text = parse_string();
    } else if (consume_word("True")) {
      v.kind = Value::Kind::boolean;
      v.flag = true;
    } else if (consume_word("False")) {
      v.kind = Value::Kind::boolean;
      v.flag = false;
    } else if (c == '(') {
      v.kind = Value::Kind::tuple;
      ++pos_;
      skip_space();
      while (peek() != ')') {
        v.ints.push_back(parse_int());
        skip_space();
        if (peek() == ',') {
          ++pos_;
          skip_space();
        } else if (peek() != ')') {
          fail("expected ',' or ')' in the tuple of '" + key + "'");
        }
      }
      ++pos_;
    } else if (c == '[') {
      fail("the value of '" + key + "' is a list; structured dtypes are not supported");
    } else {
      fail("unsupported value for '" + key + "'");
    }
    return v;
  }

  std::string_view text_;
  const std::string& source_;
  size_t pos_ = 0;
};

ElementType parse_descr(const std::string& descr, const std::string& source) {
  const std::string supported = "; expected '<f2' (float16), '<f4' (float32) or '<f8' (float64)";
  if (descr.size() == 3 && descr[0] == '>' && descr[1] == 'f')
    throw FileError(source + ": big-endian dtype '" + descr + "' is not supported" + supported);
  if (descr == "<f2" || descr == "=f2") return ElementType::float16;
  if (descr == "<f4" || descr == "=f4") return ElementType::float32;
  if (descr == "<f8" || descr == "=f8") return ElementType::float64;
  throw FileError(source + ": unsupported dtype '" + descr + "'" + supported +
                  " (NumPy has no bfloat16: save float32 and pass --dtype bfloat16)");
}

uint32_t read_le(const unsigned char* p, int bytes) {
  uint32_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

Array parse_npy(const unsigned char* data, size_t size, const std::string& source) {
  if (size < kMagic.size() + 2 || std::memcmp(data, kMagic.data(), kMagic.size()) != 0)
    throw FileError(source + ": not a .npy file (missing the \\x93NUMPY magic string)");
  const int major = data[6];
  const int minor = data[7];
  if (major < 1 || major > 3 || minor != 0)
    throw FileError(source + ": unsupported .npy format version " + std::to_string(major) + "." +
                    std::to_string(minor) + "; expected 1.0, 2.0 or 3.0");
  // Version 1.0 has a 2-byte header length, later versions a 4-byte one.
  const int len_bytes = major == 1 ? 2 : 4;
  const size_t prefix = kMagic.size() + 2 + static_cast<size_t>(len_bytes);
  if (size < prefix) throw FileError(source + ": truncated .npy file (no header length)");
  const size_t header_len = read_le(data + 8, len_bytes);
  if (size - prefix < header_len)
    throw FileError(source + ": truncated .npy header: it declares " + std::to_string(header_len) +
                    " bytes but the file has " + std::to_string(size - prefix) +
                    " after the prefix");

  const std::string_view header(reinterpret_cast<const char*>(data + prefix), header_len);
  const std::map<std::string, Value> dict = HeaderParser(header, source).parse_dict();
  for (const auto& [key, value] : dict)
    if (key != "descr" && key != "fortran_order" && key != "shape")
      throw FileError(source + ": unexpected key '" + key +
                      "' in the .npy header; expected exactly 'descr', 'fortran_order', 'shape'");
  const auto get = [&](const char* key, Value::Kind kind, const char* kind_name) -> const Value& {
    const auto it = dict.find(key);
    if (it == dict.end()) throw FileError(source + ": the .npy header has no '" + key + "' key");
    if (it->second.kind != kind)
      throw FileError(source + ": the .npy header's '" + key + "' must be " + kind_name);
    return it->second;
  };
  const ElementType type = parse_descr(get("descr", Value::Kind::string, "a string").text, source);
  if (get("fortran_order", Value::Kind::boolean, "True or False").flag)
    throw FileError(source +
                    ": Fortran-ordered arrays are not supported; save a C-ordered array "
                    "(numpy.ascontiguousarray)");
  const std::vector<int64_t>& shape = get("shape", Value::Kind::tuple, "a tuple of integers").ints;

  int64_t numel = 1;
  for (int64_t d : shape) {
    if (d != 0 && numel > std::numeric_limits<int64_t>::max() / 8 / d)
      throw FileError(source + ": shape " + shape_string(shape) + " is too large");
    numel *= d;
  }
  const size_t expected = static_cast<size_t>(numel) * static_cast<size_t>(element_size(type));
  const size_t available = size - prefix - header_len;
  if (available != expected)
    throw FileError(source + ": expected " + std::to_string(expected) + " data bytes for shape " +
                    shape_string(shape) + " of " + element_name(type) + ", found " +
                    std::to_string(available) +
                    (available < expected ? " (truncated file)" : " (trailing bytes)"));
  Array array;
  array.type = type;
  array.shape = shape;
  array.bytes.assign(data + prefix + header_len, data + size);
  return array;
}

Array read_npy(const std::string& path) {
  const std::vector<unsigned char> bytes = read_file(path);
  return parse_npy(bytes.data(), bytes.size(), path);
}

std::vector<unsigned char> format_npy(const Array& input) {
  const Array array =
      input.type == ElementType::bfloat16 ? convert(input, ElementType::float32) : input;
  const char* descr = array.type == ElementType::float16   ? "<f2"
                      : array.type == ElementType::float32 ? "<f4"
                                                           : "<f8";
  // Python tuple syntax: (), (3,), (2, 3).
  std::string shape = "(";
  shape += join(array.shape, ", ");
  shape += array.shape.size() == 1 ? ",)" : ")";
  std::string header =
      std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // NumPy pads so that the data starts at a multiple of 64 bytes; the header
  // ends with a newline.
  const size_t prefix = kMagic.size() + 4;
  const size_t total = (prefix + header.size() + 1 + 63) / 64 * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header += '\n';
  if (header.size() > 0xffff) throw FileError("format_npy: header too long for format 1.0");

  std::vector<unsigned char> out(total + array.bytes.size());
  std::memcpy(out.data(), kMagic.data(), kMagic.size());
  out[6] = 1;  // format version 1.0
  out[7] = 0;
  out[8] = static_cast<unsigned char>(header.size() & 0xff);
  out[9] = static_cast<unsigned char>(header.size() >> 8);
  std::memcpy(out.data() + prefix, header.data(), header.size());
  if (!array.bytes.empty()) std::memcpy(out.data() + total, array.bytes.data(), array.bytes.size());
  return out;
}

void write_npy(const std::string& path, const Array& array) {
  write_file(path, format_npy(array));
}

}  // namespace moba::cli
