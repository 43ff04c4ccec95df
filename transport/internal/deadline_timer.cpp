#include "transport/internal/deadline_timer.hpp"

namespace sy::transport::internal {

deadline_timer::deadline_timer() : thread_([this] { run(); }) {}

deadline_timer::~deadline_timer() { stop(); }

uint64_t deadline_timer::schedule(clock::time_point when, task t) {
  uint64_t id = 0;
  bool first = false;
  {
    std::lock_guard lock(mu_);
    id = next_id_++;
    auto it = queue_.emplace(std::make_pair(when, id), std::move(t)).first;
    index_.emplace(id, when);
    first = it == queue_.begin();
  }
  if (first) cv_.notify_one();
  return id;
}

bool deadline_timer::cancel(uint64_t id) {
  task dropped;  // destroyed outside the lock
  std::lock_guard lock(mu_);
  auto it = index_.find(id);
  if (it == index_.end()) return false;
  auto q = queue_.find({it->second, id});
  dropped = std::move(q->second);
  queue_.erase(q);
  index_.erase(it);
  return true;
}

void deadline_timer::stop() {
  std::map<std::pair<clock::time_point, uint64_t>, task> dropped;
  {
    std::lock_guard lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    dropped.swap(queue_);
    index_.clear();
  }
  cv_.notify_all();
  if (thread_.joinable()) {
    if (thread_.get_id() == std::this_thread::get_id())
      thread_.detach();
    else
      thread_.join();
  }
}

void deadline_timer::run() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    if (queue_.empty()) {
      cv_.wait(lock);
      continue;
    }
    auto first = queue_.begin();
    const auto when = first->first.first;  // a copy: cancel() may erase the node while we wait
    if (when > clock::now()) {
      cv_.wait_until(lock, when);
      continue;
    }
    task t = std::move(first->second);
    index_.erase(first->first.second);
    queue_.erase(first);
    lock.unlock();
    t();
    lock.lock();
  }
}

}  // namespace sy::transport::internal
