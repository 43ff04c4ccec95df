#include "transport/internal/worker_pool.hpp"

namespace sy::transport::internal {

worker_pool::worker_pool(unsigned threads) {
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
}

worker_pool::~worker_pool() { stop(); }

bool worker_pool::submit(task t) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return false;
    queue_.push_back(std::move(t));
  }
  cv_.notify_one();
  return true;
}

void worker_pool::stop() {
  {
    std::deque<task> dropped;  // destroyed before joining: a dropped task's destructor may unblock a running one
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
      dropped.swap(queue_);
    }
  }
  cv_.notify_all();
  for (auto& t : threads_) {
    if (!t.joinable()) continue;
    if (t.get_id() == std::this_thread::get_id())
      t.detach();  // stopped from one of its own tasks: that thread returns once its task ends
    else
      t.join();
  }
}

void worker_pool::run() {
  for (;;) {
    task t;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      t = std::move(queue_.front());
      queue_.pop_front();
    }
    t();
  }
}

}  // namespace sy::transport::internal
