#include "array.hpp"

#include <cstring>
#include <limits>

#include "core/dtype.hpp"

namespace moba::cli {

int element_size(ElementType type) noexcept {
  switch (type) {
    case ElementType::float16:
    case ElementType::bfloat16:
      return 2;
    case ElementType::float32:
      return 4;
    case ElementType::float64:
      return 8;
  }
  return 0;
}

const char* element_name(ElementType type) noexcept {
  switch (type) {
    case ElementType::float16:
      return "float16";
    case ElementType::bfloat16:
      return "bfloat16";
    case ElementType::float32:
      return "float32";
    case ElementType::float64:
      return "float64";
  }
  return "unknown";
}

ElementType element_type(DType dtype) {
  switch (dtype) {
    case DType::float16:
      return ElementType::float16;
    case DType::bfloat16:
      return ElementType::bfloat16;
    case DType::float32:
      return ElementType::float32;
    case DType::int32:
      break;
  }
  throw Error(Status::internal, "moba: element_type: int32 is not a floating-point element type");
}

DType library_dtype(ElementType type) {
  switch (type) {
    case ElementType::float16:
      return DType::float16;
    case ElementType::bfloat16:
      return DType::bfloat16;
    case ElementType::float32:
      return DType::float32;
    case ElementType::float64:
      break;
  }
  throw Error(Status::internal, "moba: library_dtype: float64 must be converted before use");
}

std::string join(const std::vector<int64_t>& values, const char* separator) {
  std::string s;
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) s += separator;
    s += std::to_string(values[i]);
  }
  return s;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  // Appending (rather than "[" + ...) sidesteps GCC 12's false -Wrestrict.
  std::string s = "[";
  s += join(shape, ", ");
  s += ']';
  return s;
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0)
      throw Error(Status::invalid_argument, "moba: negative size in shape " + shape_string(shape));
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / 8 / d)
      throw Error(Status::invalid_argument, "moba: shape " + shape_string(shape) + " is too large");
    n *= d;
  }
  return n;
}

Array::Array(ElementType t, std::vector<int64_t> s) : type(t), shape(std::move(s)) {
  bytes.assign(static_cast<size_t>(shape_numel(shape) * element_size(type)), 0);
}

int64_t Array::numel() const {
  return shape_numel(shape);
}

double Array::get(int64_t i) const {
  if (type == ElementType::float64) {
    double x;
    std::memcpy(&x, bytes.data() + i * 8, sizeof x);
    return x;
  }
  return core::load(bytes.data(), library_dtype(type), i);
}

void Array::set(int64_t i, double x) {
  if (type == ElementType::float64) {
    std::memcpy(bytes.data() + i * 8, &x, sizeof x);
    return;
  }
  // float64 -> float32 -> 16 bit rounds twice; the error is far below the
  // 16-bit formats' own resolution and only matters for float64 files.
  core::store(bytes.data(), library_dtype(type), i, static_cast<float>(x));
}

Array convert(const Array& array, ElementType type) {
  if (array.type == type) return array;
  Array out(type, array.shape);
  const int64_t n = array.numel();
  for (int64_t i = 0; i < n; ++i) out.set(i, array.get(i));
  return out;
}

}  // namespace moba::cli
