// NumPy .npy files (format versions 1.0, 2.0 and 3.0): a magic string, a
// header that is a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// and the raw little-endian data. Only what attention inputs need is
// accepted: float16, float32 and float64 in C order. NumPy has no bfloat16;
// bfloat16 arrays are written as float32.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "array.hpp"

namespace moba::cli {

/// Parses the bytes of a .npy file. `source` names the file in error messages.
/// Throws FileError for anything malformed or unsupported.
Array parse_npy(const unsigned char* data, size_t size, const std::string& source);

/// Reads a .npy file. Throws FileError.
Array read_npy(const std::string& path);

/// The bytes of a version 1.0 .npy file holding `array` (header padded to 64
/// bytes, as NumPy does). bfloat16 arrays are stored as float32.
std::vector<unsigned char> format_npy(const Array& array);

/// Writes `array` as a .npy file. Throws FileError.
void write_npy(const std::string& path, const Array& array);

}  // namespace moba::cli
