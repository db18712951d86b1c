// A one-line progress display on stderr: the current phase, a bar of the
// steps done so far and the elapsed time. A background thread keeps the
// elapsed time moving while a long call runs. It never writes to stdout, so
// --json output stays clean.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

namespace moba::cli {

class Progress {
 public:
  enum class Mode {
    off,
    automatic,  // on when stderr is a terminal, shown once a run takes > 0.5 s
    forced,     // --progress: shown from the first step, terminal or not
  };

  /// `total_steps` is the number of step() calls expected.
  Progress(Mode mode, int64_t total_steps, std::FILE* stream = stderr);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  /// Starts the next step, described by `label` (e.g. "dense forward: repeat 2/5").
  void step(const std::string& label);
  /// Changes the current step's label without advancing (e.g. a chunk count).
  void relabel(const std::string& label);
  /// Erases the line (terminal) or ends it (log file). Idempotent.
  void finish();

  bool enabled() const noexcept { return enabled_; }
  /// The line as it would be drawn now (without the leading '\r').
  std::string render() const;

 private:
  void draw_locked();
  void tick();

  bool enabled_ = false;
  bool terminal_ = false;
  bool forced_ = false;
  std::FILE* stream_;
  int64_t total_ = 0;
  int64_t done_ = -1;
  std::string label_;
  size_t last_width_ = 0;
  bool drawn_ = false;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  mutable std::mutex mutex_;
  std::condition_variable_any wake_;
  std::jthread ticker_;
};

}  // namespace moba::cli
