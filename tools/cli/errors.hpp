// The CLI's error categories. main() prints every error as "moba: <message>"
// on stderr and maps it to an exit status: 2 for a bad command line, 1 for
// anything that fails while running (unreadable files, a failed check).
// Library errors are moba::Error; their status decides (see exit_status).
#pragma once

#include <stdexcept>
#include <string>

namespace moba::cli {

/// A command-line argument is wrong or inconsistent with another (exit 2).
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An input file is missing, unreadable or malformed, or an output file
/// cannot be written (exit 1). The message names the file.
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace moba::cli
