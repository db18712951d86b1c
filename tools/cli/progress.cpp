#include "progress.hpp"

#include <unistd.h>
#include <algorithm>
#include <cstdio>

namespace moba::cli {
namespace {

constexpr int kBarWidth = 24;
constexpr auto kShowAfter = std::chrono::milliseconds(500);
constexpr auto kTerminalRefresh = std::chrono::milliseconds(100);
// Without a terminal each redraw is a new line in a log; keep them rare.
constexpr auto kLogRefresh = std::chrono::seconds(5);

}  // namespace

Progress::Progress(Mode mode, int64_t total_steps, std::FILE* stream)
    : stream_(stream),
      total_(std::max<int64_t>(total_steps, 1)),
      start_(std::chrono::steady_clock::now()) {
  terminal_ = isatty(fileno(stream)) == 1;
  forced_ = mode == Mode::forced;
  enabled_ = forced_ || (mode == Mode::automatic && terminal_);
  if (enabled_)
    ticker_ = std::jthread([this](std::stop_token stop) {
      std::unique_lock lock(mutex_);
      const auto period = terminal_ ? kTerminalRefresh : kLogRefresh;
      // The predicate is never true: the wait ends on the period or on stop.
      while (!stop.stop_requested()) {
        wake_.wait_for(lock, stop, period, [] { return false; });
        if (stop.stop_requested() || finished_) return;
        tick();
      }
    });
}

Progress::~Progress() {
  finish();
}

std::string Progress::render() const {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t done = std::clamp<int64_t>(done_, 0, total_);
  const int filled = static_cast<int>(done * kBarWidth / total_);
  std::string bar(static_cast<size_t>(filled), '=');
  if (filled < kBarWidth) bar += '>';
  bar.resize(kBarWidth, ' ');
  char elapsed[32];
  std::snprintf(elapsed, sizeof elapsed, "%.1fs", seconds);
  return "[" + bar + "] " + label_ + "  " + elapsed;
}

void Progress::draw_locked() {
  const std::string line = render();
  if (terminal_) {
    // Pad to erase what a longer previous line left behind.
    std::string padded = line;
    if (padded.size() < last_width_) padded.append(last_width_ - padded.size(), ' ');
    std::fprintf(stream_, "\r%s", padded.c_str());
    last_width_ = line.size();
  } else {
    std::fprintf(stream_, "%s\n", line.c_str());
  }
  std::fflush(stream_);
  drawn_ = true;
}

void Progress::tick() {
  if (!forced_ && !drawn_ && std::chrono::steady_clock::now() - start_ < kShowAfter) return;
  if (done_ >= 0) draw_locked();
}

void Progress::step(const std::string& label) {
  if (!enabled_) return;
  std::lock_guard lock(mutex_);
  if (finished_) return;
  ++done_;
  label_ = label;
  if (forced_ || drawn_ || std::chrono::steady_clock::now() - start_ >= kShowAfter) draw_locked();
}

void Progress::relabel(const std::string& label) {
  if (!enabled_) return;
  std::lock_guard lock(mutex_);
  if (finished_) return;
  label_ = label;
  // A log file gets the new label with the next step or tick instead.
  if (drawn_ && terminal_) draw_locked();
}

void Progress::finish() {
  if (!enabled_) return;
  {
    std::lock_guard lock(mutex_);
    if (finished_) return;
    finished_ = true;
    if (drawn_ && terminal_) {
      std::fprintf(stream_, "\r%s\r", std::string(last_width_, ' ').c_str());
      std::fflush(stream_);
    }
  }
  ticker_.request_stop();
  if (ticker_.joinable()) ticker_.join();
}

}  // namespace moba::cli
