// Whole-file reads and writes with errors that name the file.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace moba::cli {

/// The contents of `path`. Throws FileError naming the path.
std::vector<unsigned char> read_file(const std::string& path);

/// Reads `size` bytes at `offset` of `path`. Throws FileError.
std::vector<unsigned char> read_file_range(const std::string& path, size_t offset, size_t size);

/// Replaces `path` with `bytes`. Throws FileError.
void write_file(const std::string& path, const std::vector<unsigned char>& bytes);

}  // namespace moba::cli
