#include "file_io.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>

#include "errors.hpp"

namespace moba::cli {
namespace {

std::string reason() {
  return errno ? std::string(": ") + std::strerror(errno) : std::string();
}

std::ifstream open_for_reading(const std::string& path) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path + ": cannot open for reading" + reason());
  return in;
}

}  // namespace

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream in = open_for_reading(path);
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) throw FileError(path + ": cannot determine the file size");
  in.seekg(0, std::ios::beg);
  std::vector<unsigned char> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    throw FileError(path + ": read failed" + reason());
  return bytes;
}

std::vector<unsigned char> read_file_range(const std::string& path, size_t offset, size_t size) {
  std::ifstream in = open_for_reading(path);
  std::vector<unsigned char> bytes(size);
  in.seekg(static_cast<std::streamoff>(offset), std::ios::beg);
  if (!in || (size > 0 &&
              !in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size))))
    throw FileError(path + ": cannot read " + std::to_string(size) + " bytes at offset " +
                    std::to_string(offset) + " (file truncated?)");
  return bytes;
}

void write_file(const std::string& path, const std::vector<unsigned char>& bytes) {
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw FileError(path + ": cannot open for writing" + reason());
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw FileError(path + ": write failed" + reason());
}

}  // namespace moba::cli
