#include "actors/expert_host.hpp"

#include "model/error.hpp"

#include <chrono>

namespace sy::actors {

caf::error expert_host_core::load(const model::model_config& cfg, const model::checkpoint& ckpt,
                                  std::span<const std::pair<int, int>> experts, const model::progress_fn& progress) {
  if (static_cast<int>(experts.size()) > slots_)
    return model::make_error(model::model_errc::invalid_argument, name_ + ": assigned " + std::to_string(experts.size()) +
                                                                      " experts but has " + std::to_string(slots_) + " slots");
  std::map<std::pair<int, int>, std::shared_ptr<const model::expert_weights>> loaded;
  size_t done = 0;
  for (auto [l, e] : experts) {
    {
      // Already held (a coordinator that recovered re-sends the same assignment): kept, not reloaded.
      std::lock_guard lock(mu_);
      if (auto it = experts_.find({l, e}); it != experts_.end()) {
        loaded[{l, e}] = it->second;
        continue;
      }
    }
    auto w = model::load_expert(cfg, ckpt, l, e);
    if (!w) return w.error();
    done += w->bytes();
    loaded[{l, e}] = std::make_shared<const model::expert_weights>(std::move(*w));
    if (progress) progress(done, done);
  }
  if (auto err = upload_new(loaded)) return err;
  std::lock_guard lock(mu_);
  if (device_)
    for (const auto& [k, w] : experts_)
      if (!loaded.count(k)) device_->remove(k.first, k.second);
  experts_ = std::move(loaded);
  metrics_.slots(experts_.size(), static_cast<size_t>(slots_));
  return {};
}

caf::error expert_host_core::upload_new(
    const std::map<std::pair<int, int>, std::shared_ptr<const model::expert_weights>>& loaded) {
  if (!device_) return {};
  for (const auto& [k, w] : loaded) {
    {
      std::lock_guard lock(mu_);
      if (experts_.count(k)) continue;  // already on the device
    }
    if (auto err = device_->add(k.first, k.second, *w)) return err;
  }
  return {};
}

caf::error expert_host_core::add(const model::model_config& cfg, const model::checkpoint& ckpt,
                                 std::span<const std::pair<int, int>> experts, const model::progress_fn& progress) {
  std::map<std::pair<int, int>, std::shared_ptr<const model::expert_weights>> loaded;
  size_t done = 0;
  for (auto [l, e] : experts) {
    {
      std::lock_guard lock(mu_);
      if (experts_.count({l, e})) continue;
    }
    auto w = model::load_expert(cfg, ckpt, l, e);
    if (!w) return w.error();
    done += w->bytes();
    loaded[{l, e}] = std::make_shared<const model::expert_weights>(std::move(*w));
    if (progress) progress(done, done);
  }
  if (auto err = upload_new(loaded)) return err;
  std::lock_guard lock(mu_);
  experts_.merge(loaded);
  metrics_.slots(experts_.size(), static_cast<size_t>(slots_));
  return {};
}

void expert_host_core::remove(std::span<const std::pair<int, int>> experts) {
  std::lock_guard lock(mu_);
  for (const auto& k : experts)
    if (experts_.erase(k) && device_) device_->remove(k.first, k.second);
  metrics_.slots(experts_.size(), static_cast<size_t>(slots_));
}

size_t expert_host_core::held() const {
  std::lock_guard lock(mu_);
  return experts_.size();
}

caf::error expert_host_core::serve(int layer, std::span<const int> experts, std::span<const std::vector<float>* const> inputs,
                                   std::span<std::vector<float>* const> outputs) {
  if (!alive_) {
    metrics_.refused(metrics::host_metrics::refusal::down);
    return model::make_error(model::model_errc::io_error, name_ + ": host is down");
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<const model::expert_weights>> keep;
  std::vector<const model::expert_weights*> ws;
  {
    std::lock_guard lock(mu_);
    for (int e : experts) {
      auto it = experts_.find({layer, e});
      if (it == experts_.end()) {
        metrics_.refused(metrics::host_metrics::refusal::not_held);
        return model::make_error(model::model_errc::invalid_argument, name_ + ": does not hold layer " + std::to_string(layer) +
                                                                          " expert " + std::to_string(e));
      }
      keep.push_back(it->second);
      ws.push_back(it->second.get());
    }
  }
  std::vector<const float*> xs;
  std::vector<int64_t> ns;
  std::vector<float*> ys;
  for (size_t i = 0; i < ws.size(); ++i) {
    const int64_t h = ws[i]->hidden();
    ns.push_back(static_cast<int64_t>(inputs[i]->size()) / h);
    xs.push_back(inputs[i]->data());
    outputs[i]->resize(inputs[i]->size());
    ys.push_back(outputs[i]->data());
  }
  if (device_) {
    if (auto err = device_->run(layer, experts, xs, ns, ys)) {
      metrics_.refused(metrics::host_metrics::refusal::down);
      return model::make_error(model::model_errc::io_error, name_ + ": " + model::describe(err));
    }
  } else {
    model::expert_forward_many(ws, xs, ns, ys);
  }
  batches_ += ws.size();
  uint64_t rows = 0;
  for (auto n : ns) rows += static_cast<uint64_t>(n);
  metrics_.request(ws.size(), rows, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return {};
}

caf::error inproc_channel::call(int layer, uint64_t, std::span<const int> experts,
                                std::span<const std::vector<float>* const> inputs, std::span<std::vector<float>* const> outputs) {
  return host_->serve(layer, experts, inputs, outputs);
}

}  // namespace sy::actors
