#include "actors/cluster_executor.hpp"

#include "model/error.hpp"

#include <map>

namespace sy::actors {

void cluster_executor::update(placement_table p, std::vector<host_info> hosts) {
  auto v = std::make_shared<const view>(view{std::move(p), std::move(hosts)});
  std::lock_guard lock(mu_);
  if (!latest_ || v->placement.epoch >= latest_->placement.epoch) latest_ = std::move(v);
}

bool cluster_executor::ready() const {
  std::lock_guard lock(mu_);
  return latest_ && latest_->placement.complete(latest_->hosts);
}

uint64_t cluster_executor::epoch() const {
  std::lock_guard lock(mu_);
  return latest_ ? latest_->placement.epoch : 0;
}

int cluster_executor::hosts_up() const {
  std::lock_guard lock(mu_);
  if (!latest_) return 0;
  int n = 0;
  for (auto& h : latest_->hosts) n += h.up;
  return n;
}

void cluster_executor::begin_step() {
  std::lock_guard lock(mu_);
  step_ = latest_;
  failed_.assign(step_ ? step_->hosts.size() : 0, false);
}

caf::error cluster_executor::run(int layer, const model::dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                                 std::vector<std::vector<float>>& outputs) {
  using model::make_error;
  using model::model_errc;
  if (!step_) return make_error(model_errc::unsupported, "no placement yet: the cluster is not ready");
  const auto& p = step_->placement;
  const auto& hosts = step_->hosts;
  outputs.resize(plan.batches.size());
  std::vector<size_t> pending(plan.batches.size());
  for (size_t i = 0; i < pending.size(); ++i) pending[i] = i;
  caf::error last;
  // Each round sends every pending batch to a live replica not yet failed; batches of a host that
  // fails go back to pending for the next round. Bounded by the replica count.
  for (int round = 0; !pending.empty(); ++round) {
    std::map<int, std::vector<size_t>> by_host;
    for (size_t i : pending) {
      const int e = plan.batches[i].expert;
      const auto& rs = p.table[static_cast<size_t>(layer)][static_cast<size_t>(e)];
      std::vector<const replica*> live;
      double total = 0;
      for (const auto& r : rs)
        if (r.ready && hosts[static_cast<size_t>(r.host)].up && !failed_[static_cast<size_t>(r.host)]) {
          live.push_back(&r);
          total += r.share;
        }
      if (live.empty())
        return make_error(model_errc::io_error, "layer " + std::to_string(layer) + " expert " + std::to_string(e) +
                                                    " has no live replica" +
                                                    (last ? " (last failure: " + model::describe(last) + ")" : std::string()));
      // Weighted round robin by traffic share.
      const double pick = static_cast<double>(rr_++ % 1000) / 1000.0 * total;
      double acc = 0;
      const replica* chosen = live.back();
      for (const auto* r : live) {
        acc += r->share;
        if (pick < acc) {
          chosen = r;
          break;
        }
      }
      by_host[chosen->host].push_back(i);
    }
    // Every host of this round is asked at once; their answers are awaited together.
    struct call {
      int host;
      std::vector<size_t> idx;
      std::vector<int> experts;
      std::vector<const std::vector<float>*> in;
      std::vector<std::vector<float>*> out;
      std::future<caf::error> result;
    };
    std::vector<call> calls;
    calls.reserve(by_host.size());
    for (auto& [h, idx] : by_host) {
      auto& c = calls.emplace_back();
      c.host = h;
      c.idx = idx;
      for (size_t i : idx) {
        c.experts.push_back(plan.batches[i].expert);
        c.in.push_back(&inputs[i]);
        c.out.push_back(&outputs[i]);
      }
      const auto& hi = hosts[static_cast<size_t>(h)];
      auto& ch = channels_[hi.data_address];
      if (!ch) ch = connect_(hi);
      if (ch) {
        c.result = ch->call_async(layer, p.epoch, c.experts, c.in, c.out);
      } else {
        std::promise<caf::error> unreachable;
        unreachable.set_value(model::make_error(model_errc::io_error, "cannot reach " + hi.name + " at " + hi.data_address));
        c.result = unreachable.get_future();
      }
    }
    std::vector<size_t> retry;
    for (auto& c : calls) {
      if (auto err = c.result.get()) {
        failed_[static_cast<size_t>(c.host)] = true;
        channels_.erase(hosts[static_cast<size_t>(c.host)].data_address);  // reconnect if it comes back
        last = std::move(err);
        retry.insert(retry.end(), c.idx.begin(), c.idx.end());
        retries_ += c.idx.size();
      }
    }
    pending.swap(retry);
  }
  return {};
}

}  // namespace sy::actors
