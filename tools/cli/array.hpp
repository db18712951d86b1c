// Owned host arrays as the CLI reads, generates and writes them, and the
// conversions between their element types. Conversions go through the
// library's own rounding (core/dtype.hpp), so a file converted here holds
// exactly the values the backends would see.
#pragma once

#include <bit>
#include <cstdint>
#include <string>
#include <vector>

#include "moba/moba.hpp"

namespace moba::cli {

// The file formats store little-endian data and the parsers copy bytes as-is.
static_assert(std::endian::native == std::endian::little, "moba CLI assumes a little-endian host");

/// Element types the CLI reads from files. float64 only ever appears in files
/// (numpy's default); it is converted before reaching the library.
enum class ElementType { float16, bfloat16, float32, float64 };

int element_size(ElementType type) noexcept;
/// "float16", "bfloat16", "float32" or "float64".
const char* element_name(ElementType type) noexcept;
/// The element type of a library dtype; throws moba::Error for int32.
ElementType element_type(DType dtype);
/// The library dtype of an element type; throws moba::Error for float64.
DType library_dtype(ElementType type);

/// The integers separated by `separator`: join({1, 2}, ", ") is "1, 2".
std::string join(const std::vector<int64_t>& values, const char* separator);
/// "[2, 3, 4]".
std::string shape_string(const std::vector<int64_t>& shape);
/// Product of the dimensions; throws moba::Error on overflow or a negative size.
int64_t shape_numel(const std::vector<int64_t>& shape);

/// A contiguous row-major host array.
struct Array {
  ElementType type = ElementType::float32;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;

  Array() = default;
  /// Zero-filled array of `shape`.
  Array(ElementType type, std::vector<int64_t> shape);

  int64_t numel() const;
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  /// Element `i` widened to double.
  double get(int64_t i) const;
  /// Writes `x` rounded to the element type (round-to-nearest-even).
  void set(int64_t i, double x);
};

/// A copy of `array` with its elements rounded to `type`.
Array convert(const Array& array, ElementType type);

}  // namespace moba::cli
