#pragma once
#include <chrono>
#include <cstddef>
#include <string>

namespace sy::apps {

/// Prints progress of long work to stderr: a live line on a terminal, else one line per 10%.
/// Silent for work under `min_total` bytes.
class progress_printer {
 public:
  progress_printer(std::string what, size_t min_total = size_t{64} << 20);
  ~progress_printer();
  void operator()(size_t done, size_t total);

 private:
  std::string what_;
  size_t min_total_;
  bool tty_;
  int last_decile_ = -1;
  bool printed_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace sy::apps
