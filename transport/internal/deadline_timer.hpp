#pragma once
/// One thread that runs tasks at their deadlines; cancellable. Used by the in-process link.
#include "transport/internal/task.hpp"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>

namespace sy::transport::internal {

class deadline_timer {
 public:
  using clock = std::chrono::steady_clock;
  deadline_timer();
  ~deadline_timer();
  deadline_timer(const deadline_timer&) = delete;
  deadline_timer& operator=(const deadline_timer&) = delete;

  /// Runs `t` on the timer thread at `when` unless cancelled first; returns an id for `cancel`.
  uint64_t schedule(clock::time_point when, task t);
  /// Returns whether the task was still waiting (and is now dropped).
  bool cancel(uint64_t id);
  /// Drops every waiting task and joins the thread. Idempotent.
  void stop();

 private:
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<clock::time_point, uint64_t>, task> queue_;
  std::unordered_map<uint64_t, clock::time_point> index_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace sy::transport::internal
