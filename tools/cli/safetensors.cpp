#include "safetensors.hpp"

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "errors.hpp"
#include "file_io.hpp"

namespace moba::cli {
namespace {

// The reference implementation refuses headers above 100 MB; so do we,
// which also bounds what a corrupt length field can make us allocate.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Bytes per element of every dtype the format defines, so that files holding
// other tensors (int64 position ids, fp8 weights...) can still be validated.
int dtype_bytes(const std::string& dtype) {
  static const std::map<std::string, int> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

const char* dtype_code(ElementType type) {
  switch (type) {
    case ElementType::float16:
      return "F16";
    case ElementType::bfloat16:
      return "BF16";
    case ElementType::float32:
      return "F32";
    case ElementType::float64:
      return "F64";
  }
  return "?";
}

uint64_t read_u64_le(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t header_length(const unsigned char* prefix, size_t prefix_size, uint64_t file_size,
                       const std::string& source) {
  if (file_size < 8 || prefix_size < 8)
    throw FileError(source + ": not a safetensors file (shorter than its 8-byte header length)");
  const uint64_t n = read_u64_le(prefix);
  if (n > kMaxHeaderBytes)
    throw FileError(source + ": safetensors header length " + std::to_string(n) +
                    " exceeds the 100 MB limit (not a safetensors file?)");
  if (n > file_size - 8)
    throw FileError(source + ": safetensors header length " + std::to_string(n) +
                    " exceeds the file size (" + std::to_string(file_size) + " bytes)");
  return n;
}

uint64_t json_uint(const nlohmann::json& j, const std::string& what, const std::string& source) {
  if (!j.is_number_unsigned() && !(j.is_number_integer() && j.get<int64_t>() >= 0))
    throw FileError(source + ": " + what + " must be a non-negative integer, got " + j.dump());
  return j.get<uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& name, const nlohmann::json& j,
                             const std::string& source) {
  const std::string where = source + ": tensor '" + name + "'";
  if (!j.is_object()) throw FileError(where + ": expected a JSON object, got " + j.dump());
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!j.contains(key)) throw FileError(where + ": missing \"" + key + "\"");
  SafetensorsEntry e;
  e.name = name;
  if (!j["dtype"].is_string()) throw FileError(where + ": \"dtype\" must be a string");
  e.dtype = j["dtype"].get<std::string>();
  const int size = dtype_bytes(e.dtype);
  if (size == 0) throw FileError(where + ": unknown dtype \"" + e.dtype + "\"");
  if (!j["shape"].is_array()) throw FileError(where + ": \"shape\" must be an array of integers");
  for (const auto& d : j["shape"]) {
    const uint64_t v = json_uint(d, "tensor '" + name + "' shape entry", source);
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw FileError(where + ": shape entry too large");
    e.shape.push_back(static_cast<int64_t>(v));
  }
  const auto& off = j["data_offsets"];
  if (!off.is_array() || off.size() != 2)
    throw FileError(where + ": \"data_offsets\" must be [begin, end], got " + off.dump());
  e.begin = json_uint(off[0], "tensor '" + name + "' data_offsets[0]", source);
  e.end = json_uint(off[1], "tensor '" + name + "' data_offsets[1]", source);
  if (e.end < e.begin)
    throw FileError(where + ": data_offsets end (" + std::to_string(e.end) + ") < begin (" +
                    std::to_string(e.begin) + ")");
  uint64_t numel = 1;
  for (int64_t d : e.shape) {
    if (d != 0 && numel > std::numeric_limits<uint64_t>::max() / 8 / static_cast<uint64_t>(d))
      throw FileError(where + ": shape " + shape_string(e.shape) + " is too large");
    numel *= static_cast<uint64_t>(d);
  }
  if (e.end - e.begin != numel * static_cast<uint64_t>(size))
    throw FileError(where + ": data_offsets span " + std::to_string(e.end - e.begin) +
                    " bytes, but shape " + shape_string(e.shape) + " of " + e.dtype + " needs " +
                    std::to_string(numel * static_cast<uint64_t>(size)));
  return e;
}

}  // namespace

const SafetensorsEntry& SafetensorsHeader::find(const std::string& name,
                                                const std::string& source) const {
  for (const auto& e : entries)
    if (e.name == name) return e;
  std::string names;
  for (const auto& e : entries) {
    if (!names.empty()) names += ", ";
    names += e.name;
  }
  throw FileError(source + ": no tensor named '" + name +
                  "'; the file holds: " + (names.empty() ? std::string("(none)") : names));
}

SafetensorsHeader parse_safetensors_header(const unsigned char* prefix, size_t prefix_size,
                                           uint64_t file_size, const std::string& source) {
  const uint64_t n = header_length(prefix, prefix_size, file_size, source);
  if (prefix_size < 8 + n) throw FileError(source + ": truncated safetensors header");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(prefix + 8, prefix + 8 + n);
  } catch (const nlohmann::json::parse_error& e) {
    throw FileError(source + ": the safetensors header is not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw FileError(source + ": the safetensors header must be a JSON object");

  SafetensorsHeader h;
  h.data_offset = 8 + n;
  for (const auto& [key, value] : j.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        throw FileError(source + ": \"__metadata__\" must be an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          throw FileError(source + ": \"__metadata__\" value of '" + mk + "' must be a string");
        h.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(key, value, source));
  }
  std::sort(h.entries.begin(), h.entries.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.begin < b.begin; });
  const uint64_t data_size = file_size - h.data_offset;
  uint64_t expected = 0;
  for (const auto& e : h.entries) {
    if (e.begin != expected)
      throw FileError(source + ": tensor '" + e.name + "' starts at data offset " +
                      std::to_string(e.begin) + ", expected " + std::to_string(expected) +
                      " (tensors must tile the data without gaps or overlaps)");
    expected = e.end;
  }
  if (expected != data_size)
    throw FileError(source + ": the tensors cover " + std::to_string(expected) +
                    " data bytes but the file has " + std::to_string(data_size) +
                    (expected > data_size ? " (truncated file)" : " (trailing bytes)"));
  return h;
}

Array decode_safetensors_entry(const SafetensorsEntry& e, const unsigned char* data,
                               const std::string& source) {
  ElementType type;
  if (e.dtype == "F16")
    type = ElementType::float16;
  else if (e.dtype == "BF16")
    type = ElementType::bfloat16;
  else if (e.dtype == "F32")
    type = ElementType::float32;
  else if (e.dtype == "F64")
    type = ElementType::float64;
  else
    throw FileError(source + ": tensor '" + e.name + "' has unsupported dtype " + e.dtype +
                    "; expected F16, BF16, F32 or F64");
  Array a;
  a.type = type;
  a.shape = e.shape;
  a.bytes.assign(data, data + (e.end - e.begin));
  return a;
}

std::map<std::string, Array> parse_safetensors(const unsigned char* data, size_t size,
                                               const std::vector<std::string>& names,
                                               const std::string& source) {
  const SafetensorsHeader h = parse_safetensors_header(data, size, size, source);
  std::map<std::string, Array> out;
  for (const auto& name : names) {
    const SafetensorsEntry& e = h.find(name, source);
    out[name] = decode_safetensors_entry(e, data + h.data_offset + e.begin, source);
  }
  return out;
}

std::map<std::string, Array> read_safetensors(const std::string& path,
                                              const std::vector<std::string>& names) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw FileError(path + ": cannot open for reading");
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.close();
  // The length first, then the header, then only the tensors asked for: a
  // checkpoint may be far larger than the three tensors we need.
  const std::vector<unsigned char> len = read_file_range(path, 0, std::min<uint64_t>(8, file_size));
  const uint64_t n = header_length(len.data(), len.size(), file_size, path);
  const std::vector<unsigned char> prefix = read_file_range(path, 0, static_cast<size_t>(8 + n));
  const SafetensorsHeader h =
      parse_safetensors_header(prefix.data(), prefix.size(), file_size, path);
  std::map<std::string, Array> out;
  for (const auto& name : names) {
    const SafetensorsEntry& e = h.find(name, path);
    const std::vector<unsigned char> bytes = read_file_range(
        path, static_cast<size_t>(h.data_offset + e.begin), static_cast<size_t>(e.end - e.begin));
    out[name] = decode_safetensors_entry(e, bytes.data(), path);
  }
  return out;
}

std::vector<unsigned char> format_safetensors(
    const std::vector<std::pair<std::string, const Array*>>& tensors,
    const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, array] : tensors) {
    if (name == "__metadata__")
      throw FileError("format_safetensors: '__metadata__' is not a valid tensor name");
    const uint64_t size = array->bytes.size();
    header[name] = {{"dtype", dtype_code(array->type)},
                    {"shape", array->shape},
                    {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text = header.dump();
  // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<unsigned char> out;
  out.reserve(8 + text.size() + offset);
  for (int i = 0; i < 8; ++i)
    out.push_back(static_cast<unsigned char>((uint64_t{text.size()} >> (8 * i)) & 0xff));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& [name, array] : tensors)
    out.insert(out.end(), array->bytes.begin(), array->bytes.end());
  return out;
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, const Array*>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_file(path, format_safetensors(tensors, metadata));
}

}  // namespace moba::cli
