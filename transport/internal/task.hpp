#pragma once
/// A move-only `void()` callable (std::function needs copyable targets; ours capture batches).
#include <memory>
#include <type_traits>
#include <utility>

namespace sy::transport::internal {

class task {
 public:
  task() = default;
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, task>>>
  task(F&& f) : impl_(std::make_unique<model<std::decay_t<F>>>(std::forward<F>(f))) {}  // NOLINT: implicit by design
  void operator()() { impl_->run(); }
  explicit operator bool() const { return impl_ != nullptr; }

 private:
  struct concept_t {
    virtual ~concept_t() = default;
    virtual void run() = 0;
  };
  template <class F>
  struct model final : concept_t {
    explicit model(F&& f) : fn(std::move(f)) {}
    explicit model(const F& f) : fn(f) {}
    void run() override { fn(); }
    F fn;
  };
  std::unique_ptr<concept_t> impl_;
};

}  // namespace sy::transport::internal
