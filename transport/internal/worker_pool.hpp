#pragma once
/// A fixed pool of threads running tasks in submission order (any thread takes the next one).
#include "transport/internal/task.hpp"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace sy::transport::internal {

class worker_pool {
 public:
  explicit worker_pool(unsigned threads);
  ~worker_pool();
  worker_pool(const worker_pool&) = delete;
  worker_pool& operator=(const worker_pool&) = delete;

  /// Queues `t`; returns false (and drops it) once stopped.
  bool submit(task t);
  /// Drops queued tasks, waits for running ones, joins. Idempotent.
  void stop();

 private:
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<task> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace sy::transport::internal
