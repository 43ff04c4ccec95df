#include "apps/progress.hpp"

#include <unistd.h>

#include <cstdio>

namespace sy::apps {

progress_printer::progress_printer(std::string what, size_t min_total)
    : what_(std::move(what)), min_total_(min_total), tty_(isatty(STDERR_FILENO)), start_(std::chrono::steady_clock::now()) {}

progress_printer::~progress_printer() {
  if (printed_ && tty_) std::fputc('\n', stderr);
}

void progress_printer::operator()(size_t done, size_t total) {
  if (total < min_total_ || total == 0) return;
  const int pct = static_cast<int>(100.0 * static_cast<double>(done) / static_cast<double>(total));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double gb = static_cast<double>(done) / 1e9, tgb = static_cast<double>(total) / 1e9;
  if (tty_) {
    std::fprintf(stderr, "\r%s: %3d%% (%.2f / %.2f GB, %.1f s)", what_.c_str(), pct, gb, tgb, secs);
    printed_ = true;
  } else if (pct / 10 != last_decile_) {
    last_decile_ = pct / 10;
    std::fprintf(stderr, "%s: %d%% (%.2f / %.2f GB, %.1f s)\n", what_.c_str(), pct, gb, tgb, secs);
  }
  std::fflush(stderr);
}

}  // namespace sy::apps
