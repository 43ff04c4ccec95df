#pragma once
/// An expert host's data-plane half: the experts it holds (one per slot) and the pure function that
/// answers a token batch. The control half (registration, assignment, readiness) is its actor.
#include "metrics/metrics.hpp"
#include "model/moe.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"

#include <atomic>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace sy::actors {

class expert_host_core {
 public:
  expert_host_core(std::string name, int slots) : name_(std::move(name)), slots_(slots), metrics_(name_) {
    metrics_.slots(0, static_cast<size_t>(slots_));
  }

  /// Computes on `device` instead of the CPU (call before the first load): loaded experts are
  /// uploaded there, dropped ones freed, and every batch runs there. Host memory keeps a copy of
  /// the weights (what a replacement or a device failure would reload from).
  void set_device(std::shared_ptr<model::device_experts> device) { device_ = std::move(device); }
  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] int slots() const { return slots_; }

  /// Loads the (layer, expert) pairs from the checkpoint (bf16 weights stay bf16), replacing what
  /// was held. Progress goes to `progress` when given.
  [[nodiscard]] caf::error load(const model::model_config& cfg, const model::checkpoint& ckpt,
                                std::span<const std::pair<int, int>> experts, const model::progress_fn& progress = {});

  /// Loads more (layer, expert) pairs next to those held (a rebalance's new replicas; a pair
  /// already held is kept). Above `slots` only while a rebalance moves replicas: the coordinator
  /// removes the old ones once no router routes to them.
  [[nodiscard]] caf::error add(const model::model_config& cfg, const model::checkpoint& ckpt,
                               std::span<const std::pair<int, int>> experts, const model::progress_fn& progress = {});
  /// Drops pairs (a batch already running keeps its weights until it ends).
  void remove(std::span<const std::pair<int, int>> experts);

  /// Computes experts[i] on inputs[i] into outputs[i]. Refuses a batch for an expert it does not hold
  /// (the router then retries elsewhere), and everything while marked dead.
  [[nodiscard]] caf::error serve(int layer, std::span<const int> experts, std::span<const std::vector<float>* const> inputs,
                                 std::span<std::vector<float>* const> outputs);

  /// Fault injection for tests: a dead host refuses every batch, as a crashed peer would fail them.
  void set_alive(bool alive) { alive_ = alive; }
  [[nodiscard]] bool alive() const { return alive_; }
  [[nodiscard]] size_t held() const;
  [[nodiscard]] uint64_t batches_served() const { return batches_; }

 private:
  std::string name_;
  int slots_;
  std::atomic<bool> alive_{true};
  std::atomic<uint64_t> batches_{0};
  metrics::host_metrics metrics_;
  mutable std::mutex mu_;
  /// Shared so a batch in flight keeps its weights alive across a reload.
  std::map<std::pair<int, int>, std::shared_ptr<const model::expert_weights>> experts_;
  std::shared_ptr<model::device_experts> device_;
  /// Uploads the pairs of `loaded` that `experts_` lacks (before they become visible to batches).
  [[nodiscard]] caf::error upload_new(const std::map<std::pair<int, int>, std::shared_ptr<const model::expert_weights>>& loaded);
};

/// The data plane as a router sees it: one host, asked to run some experts of a layer on rows.
/// The transport's links implement it across processes; `inproc_channel` is a direct call.
class expert_channel {
 public:
  virtual ~expert_channel() = default;
  [[nodiscard]] virtual caf::error call(int layer, uint64_t epoch, std::span<const int> experts,
                                        std::span<const std::vector<float>* const> inputs,
                                        std::span<std::vector<float>* const> outputs) = 0;
  /// Starts `call` and returns at once where the channel can (a network link); the spans' targets
  /// must stay alive until the future is ready. The default runs `call` now.
  [[nodiscard]] virtual std::future<caf::error> call_async(int layer, uint64_t epoch, std::span<const int> experts,
                                                           std::span<const std::vector<float>* const> inputs,
                                                           std::span<std::vector<float>* const> outputs) {
    std::promise<caf::error> p;
    p.set_value(call(layer, epoch, experts, inputs, outputs));
    return p.get_future();
  }
  /// Fails every call in flight at once (the host is known to be gone: no reply is worth waiting
  /// for); once it returns, no call writes its outputs any more. A channel whose calls complete
  /// before `call_async` returns has nothing to do.
  virtual void abandon() {}
};

class inproc_channel final : public expert_channel {
 public:
  explicit inproc_channel(std::shared_ptr<expert_host_core> host) : host_(std::move(host)) {}
  [[nodiscard]] caf::error call(int layer, uint64_t epoch, std::span<const int> experts,
                                std::span<const std::vector<float>* const> inputs,
                                std::span<std::vector<float>* const> outputs) override;

 private:
  std::shared_ptr<expert_host_core> host_;
};

}  // namespace sy::actors
