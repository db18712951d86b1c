// .safetensors files: an 8-byte little-endian header length N, N bytes of
// JSON mapping tensor names to {"dtype", "shape", "data_offsets": [begin,
// end]} (offsets relative to the data that follows the header) plus an
// optional "__metadata__" object of strings, then the raw little-endian data.
// Validation follows the reference implementation: the tensors must tile the
// data section exactly, in order, without gaps or overlaps.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "array.hpp"

namespace moba::cli {

/// One tensor of a safetensors header.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // as in the file: "F32", "BF16", "I64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> entries;  // in file order (by offset)
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // where the data section starts in the file

  /// The entry named `name`; throws FileError listing the available names.
  const SafetensorsEntry& find(const std::string& name, const std::string& source) const;
};

/// Parses the 8-byte length and the JSON header at the start of a file of
/// `file_size` bytes (`prefix` holds at least the first 8 + N bytes, or the
/// whole file). Throws FileError naming `source`.
SafetensorsHeader parse_safetensors_header(const unsigned char* prefix, size_t prefix_size,
                                           uint64_t file_size, const std::string& source);

/// Decodes one entry's bytes (`data` is that tensor's end - begin bytes).
/// Only F16, BF16, F32 and F64 tensors can be decoded; others throw FileError.
Array decode_safetensors_entry(const SafetensorsEntry& entry, const unsigned char* data,
                               const std::string& source);

/// Parses a whole file held in memory and decodes the tensors `names`.
std::map<std::string, Array> parse_safetensors(const unsigned char* data, size_t size,
                                               const std::vector<std::string>& names,
                                               const std::string& source);

/// Reads the tensors `names` of the file at `path`, reading only the header
/// and those tensors' bytes.
std::map<std::string, Array> read_safetensors(const std::string& path,
                                              const std::vector<std::string>& names);

/// The bytes of a safetensors file holding `tensors` in the given order.
std::vector<unsigned char> format_safetensors(
    const std::vector<std::pair<std::string, const Array*>>& tensors,
    const std::map<std::string, std::string>& metadata = {});

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, const Array*>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moba::cli
