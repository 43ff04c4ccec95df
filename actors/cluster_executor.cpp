#include "actors/cluster_executor.hpp"

#include "metrics/metrics.hpp"
#include "model/error.hpp"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <string>

namespace sy::actors {
namespace {
/// Below this many rows per replica an expert's batch is not split: reading the expert's weights
/// costs as much for a few rows as for one, so splitting would multiply that cost.
constexpr int64_t kMinSplitRows = 32;
}  // namespace

void cluster_executor::set_shape(int layers, int experts, std::vector<bool> moe_layer) {
  shape_ = {layers, experts, std::move(moe_layer)};
}

bool cluster_executor::update(placement_table p, std::vector<host_info> hosts) {
  std::string bad;
  if (shape_.layers >= 0 && (p.layers != shape_.layers || p.experts != shape_.experts || p.moe_layer != shape_.moe_layer))
    bad = "it is for " + std::to_string(p.layers) + " layers of " + std::to_string(p.experts) +
          " experts, this router serves " + std::to_string(shape_.layers) + " of " + std::to_string(shape_.experts) +
          " (another model, or another cluster at the coordinator's address)";
  if (bad.empty() && p.table.size() != static_cast<size_t>(p.layers)) bad = "its table does not have one row per layer";
  for (size_t l = 0; bad.empty() && l < p.table.size(); ++l) {
    const bool sparse = l < p.moe_layer.size() && p.moe_layer[l];
    if (sparse && p.table[l].size() != static_cast<size_t>(p.experts)) bad = "layer " + std::to_string(l) + " does not list every expert";
    for (const auto& reps : p.table[l])
      for (const auto& r : reps)
        if (bad.empty() && (r.host < 0 || static_cast<size_t>(r.host) >= hosts.size()))
          bad = "a replica of layer " + std::to_string(l) + " names host " + std::to_string(r.host) + ", which it does not list";
  }
  if (!bad.empty()) {
    spdlog::error("router: placement epoch {} ignored: {}", p.epoch, bad);
    return false;
  }
  auto v = std::make_shared<const view>(view{std::move(p), std::move(hosts)});
  {
    std::lock_guard lock(mu_);
    if (!latest_ || v->placement.epoch >= latest_->placement.epoch) latest_ = std::move(v);
  }
  updated_.notify_all();
  return true;
}

bool cluster_executor::ready() const {
  std::lock_guard lock(mu_);
  return latest_ && latest_->placement.complete(latest_->hosts);
}

uint64_t cluster_executor::epoch() const {
  std::lock_guard lock(mu_);
  return latest_ ? latest_->placement.epoch : 0;
}

placement_table cluster_executor::placement() const {
  std::lock_guard lock(mu_);
  return latest_ ? latest_->placement : placement_table{};
}

std::string cluster_executor::state_json() const {
  std::shared_ptr<const view> v;
  {
    std::lock_guard lock(mu_);
    v = latest_;
  }
  nlohmann::json j;
  if (!v) return nlohmann::json{{"epoch", 0}, {"hosts", nlohmann::json::array()}, {"layers", nlohmann::json::array()}}.dump();
  const auto& p = v->placement;
  std::vector<int> held(v->hosts.size(), 0);
  auto layers = nlohmann::json::array();
  for (int l = 0; l < p.layers; ++l) {
    if (!p.moe_layer[static_cast<size_t>(l)]) continue;
    auto experts = nlohmann::json::array();
    for (const auto& rs : p.table[static_cast<size_t>(l)]) {
      auto reps = nlohmann::json::array();
      for (const auto& r : rs) {
        reps.push_back({{"host", r.host}, {"share", r.share}, {"version", r.version}, {"ready", r.ready}});
        if (r.host >= 0 && static_cast<size_t>(r.host) < held.size()) ++held[static_cast<size_t>(r.host)];
      }
      experts.push_back(std::move(reps));
    }
    layers.push_back({{"layer", l}, {"experts", std::move(experts)}});
  }
  auto hosts = nlohmann::json::array();
  for (const auto& h : v->hosts)
    hosts.push_back({{"id", h.id}, {"name", h.name}, {"address", h.data_address}, {"slots", h.slots}, {"up", h.up},
                     {"replicas", held[static_cast<size_t>(h.id)]}});
  j["epoch"] = p.epoch;
  j["hosts"] = std::move(hosts);
  j["layers"] = std::move(layers);
  return j.dump();
}

int cluster_executor::hosts_up() const {
  std::lock_guard lock(mu_);
  if (!latest_) return 0;
  int n = 0;
  for (auto& h : latest_->hosts) n += h.up;
  return n;
}

std::vector<host_info> cluster_executor::hosts() const {
  std::lock_guard lock(mu_);
  return latest_ ? latest_->hosts : std::vector<host_info>{};
}

std::vector<std::vector<double>> cluster_executor::take_counts() {
  std::lock_guard lock(counts_mu_);
  auto out = counts_;
  for (auto& row : counts_) std::fill(row.begin(), row.end(), 0.0);
  return out;
}

bool cluster_executor::drained(uint64_t epoch) const { return !in_step_ || step_epoch_ >= epoch; }

namespace {
// Envoy's outlier ejection starts at 30 s; a replica here is passed over only while another can
// take its rows, so the first wait is short: about the coordinator's default time to mark a
// silent host down (3 heartbeats of 500 ms).
constexpr std::chrono::milliseconds kAvoidFirst{2000};
constexpr std::chrono::milliseconds kAvoidMost{30000};
}  // namespace

void cluster_executor::note_failure(const std::string& address) {
  auto& a = avoid_[address];
  a.wait = a.wait.count() == 0 ? kAvoidFirst : std::min(a.wait * 2, kAvoidMost);
  a.until = std::chrono::steady_clock::now() + a.wait;
}

void cluster_executor::fail_host(size_t host, const std::string& address) {
  if (failed_[host]) return;  // one failure a step: both micro-batches may see it
  failed_[host] = true;
  note_failure(address);
}

bool cluster_executor::marked_down(const std::string& address) const {
  std::lock_guard lock(mu_);
  if (!latest_) return false;
  for (const auto& h : latest_->hosts)
    if (h.data_address == address) return !h.up;
  return true;
}

void cluster_executor::await(std::future<caf::error>& result, const std::string& address) {
  // A reply normally comes in far less than a slice; only a slow or hung host makes this look.
  constexpr std::chrono::milliseconds slice{20};
  while (result.wait_for(slice) != std::future_status::ready) {
    if (!marked_down(address)) continue;
    auto it = channels_.find(address);
    if (it == channels_.end()) continue;  // abandoned already: its calls are failing
    auto ch = std::move(it->second);
    channels_.erase(it);
    if (ch) ch->abandon();
  }
}

void cluster_executor::mark_avoided() {
  const auto now = std::chrono::steady_clock::now();
  avoided_.assign(step_ ? step_->hosts.size() : 0, false);
  if (!step_ || avoid_.empty()) return;
  for (size_t h = 0; h < step_->hosts.size(); ++h) {
    auto it = avoid_.find(step_->hosts[h].data_address);
    avoided_[h] = it != avoid_.end() && it->second.until > now;
  }
}

void cluster_executor::begin_step() {
  {
    std::lock_guard lock(mu_);
    step_ = latest_;
  }
  failed_.assign(step_ ? step_->hosts.size() : 0, false);
  mark_avoided();
  const uint64_t e = step_ ? step_->placement.epoch : 0;
  step_epoch_ = e;
  in_step_ = true;
  if (e != sent_epoch_) {
    sent_.clear();
    sent_epoch_ = e;
  }
}

void cluster_executor::end_step() { in_step_ = false; }

bool cluster_executor::wait_for_replica(int layer, int expert) {
  // The step's epoch has no live replica of this expert (its hosts failed). An expert FFN of the
  // same version is the same pure function wherever it runs, so the rest of the step may move to a
  // newer epoch in which the coordinator has re-placed the expert; wait for one, up to
  // replica_wait.
  auto has_live = [&](const view& v) {
    if (static_cast<size_t>(layer) >= v.placement.table.size()) return false;
    const auto& rs = v.placement.table[static_cast<size_t>(layer)];
    if (static_cast<size_t>(expert) >= rs.size()) return false;
    for (const auto& r : rs[static_cast<size_t>(expert)]) {
      const auto h = static_cast<size_t>(r.host);
      if (r.ready && h < v.hosts.size() && v.hosts[h].up && !(h < failed_.size() && failed_[h])) return true;
    }
    return false;
  };
  std::unique_lock lock(mu_);
  const bool ok = updated_.wait_for(lock, replica_wait_, [&] { return latest_ && latest_ != step_ && has_live(*latest_); });
  if (!ok) return false;
  step_ = latest_;
  step_epoch_ = step_->placement.epoch;
  mark_avoided();
  return true;
}

namespace {
/// A piece is rows [off, off + n) of batch i; a whole batch is sent without copying.
struct piece {
  size_t batch;
  int64_t off, n;
};
/// One host's share of a round.
struct call {
  int host;
  std::vector<piece> pieces;
  std::vector<int> experts;
  std::vector<std::vector<float>> in_copy, out_copy;  ///< for pieces that are part of a batch
  std::vector<const std::vector<float>*> in;
  std::vector<std::vector<float>*> out;
  std::future<caf::error> result;
};
}  // namespace

/// A layer's batches on their way: the calls of the round in flight and what is left to send.
struct cluster_executor::flight final : model::expert_executor::ticket {
  int layer = 0;
  const model::dispatch_plan* plan = nullptr;
  const std::vector<std::vector<float>>* inputs = nullptr;
  std::vector<std::vector<float>>* outputs = nullptr;
  std::vector<piece> pending;
  std::vector<call> calls;
  caf::error last;    ///< the last host failure (named when no replica is left)
  caf::error failed;  ///< the layer failed before or while sending
  ~flight() override {
    // A flight dropped unfinished still waits for its calls: they write into its buffers.
    for (auto& c : calls)
      if (c.result.valid()) c.result.wait();
  }
};

caf::error cluster_executor::run(int layer, const model::dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                                 std::vector<std::vector<float>>& outputs) {
  return finish(start(layer, plan, inputs, outputs));
}

std::unique_ptr<model::expert_executor::ticket> cluster_executor::start(int layer, const model::dispatch_plan& plan,
                                                                        const std::vector<std::vector<float>>& inputs,
                                                                        std::vector<std::vector<float>>& outputs) {
  using model::make_error;
  using model::model_errc;
  auto f = std::make_unique<flight>();
  f->layer = layer;
  f->plan = &plan;
  f->inputs = &inputs;
  f->outputs = &outputs;
  if (!step_) {
    f->failed = make_error(model_errc::unsupported, "no placement yet: the cluster is not ready");
    return f;
  }
  {
    const auto& p = step_->placement;
    std::lock_guard lock(counts_mu_);
    if (counts_.size() != static_cast<size_t>(p.layers)) counts_.assign(static_cast<size_t>(p.layers), std::vector<double>(static_cast<size_t>(p.experts), 0.0));
    for (const auto& b : plan.batches)
      if (layer < p.layers && b.expert < p.experts) {
        counts_[static_cast<size_t>(layer)][static_cast<size_t>(b.expert)] += static_cast<double>(b.tokens.size());
        metrics::tokens_routed(layer, b.expert, b.tokens.size());
      }
  }
  outputs.resize(plan.batches.size());
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    const auto n = static_cast<int64_t>(plan.batches[i].tokens.size());
    outputs[i].resize(inputs[i].size());
    f->pending.push_back({i, 0, n});
  }
  f->failed = send_round(*f);
  return f;
}

caf::error cluster_executor::finish(std::unique_ptr<model::expert_executor::ticket> t) {
  auto* f = dynamic_cast<flight*>(t.get());
  if (!f) return model::make_error(model::model_errc::invalid_argument, "cluster executor: a ticket from another executor");
  // Each round sent every pending piece to live replicas not yet failed, split by share; pieces of
  // a host that failed go back to pending for the next round. Bounded by the replica count.
  while (true) {
    const auto& hosts = step_->hosts;
    const auto& plan = *f->plan;
    auto& outputs = *f->outputs;
    std::vector<piece> retry;
    for (auto& c : f->calls) {
      const auto& address = hosts[static_cast<size_t>(c.host)].data_address;
      await(c.result, address);
      if (auto err = c.result.get()) {
        fail_host(static_cast<size_t>(c.host), address);
        channels_.erase(address);  // reconnect if it comes back
        f->last = std::move(err);
        retry.insert(retry.end(), c.pieces.begin(), c.pieces.end());
        retries_ += c.pieces.size();
        continue;
      }
      if (!avoid_.empty()) avoid_.erase(address);
      // Rows of split batches go back into place.
      size_t k = 0;
      for (size_t j = 0; j < c.pieces.size(); ++j) {
        const auto& pc = c.pieces[j];
        const auto whole = static_cast<int64_t>(plan.batches[pc.batch].tokens.size());
        if (pc.n == whole) continue;
        const int64_t hidden = static_cast<int64_t>((*f->inputs)[pc.batch].size()) / whole;
        std::copy(c.out_copy[k].begin(), c.out_copy[k].end(), outputs[pc.batch].begin() + pc.off * hidden);
        ++k;
      }
    }
    f->calls.clear();
    if (f->failed) return std::move(f->failed);
    f->pending.insert(f->pending.end(), retry.begin(), retry.end());
    if (f->pending.empty()) return {};
    f->failed = send_round(*f);
  }
}

caf::error cluster_executor::send_round(flight& f) {
  using model::make_error;
  using model::model_errc;
  const int layer = f.layer;
  const auto& plan = *f.plan;
  const auto& inputs = *f.inputs;
  auto& outputs = *f.outputs;
  auto& pending = f.pending;
  while (true) {
    const auto& p = step_->placement;
    const auto& hosts = step_->hosts;
    if (failed_.size() < hosts.size()) failed_.resize(hosts.size(), false);
    if (avoided_.size() < hosts.size()) avoided_.resize(hosts.size(), false);
    bool repinned = false;
    std::map<int, std::vector<piece>> by_host;
    std::map<int, double> round_rows;  ///< rows given to each host in this round
    // Largest pieces first, so the small ones fill in around them.
    std::stable_sort(pending.begin(), pending.end(), [](const piece& a, const piece& b) { return a.n > b.n; });
    for (const auto& pc : pending) {
      const int e = plan.batches[pc.batch].expert;
      const auto& rs = p.table[static_cast<size_t>(layer)][static_cast<size_t>(e)];
      std::vector<const replica*> live;
      double total = 0;
      // Replicas on hosts under avoidance only when no other is live.
      for (const bool take_avoided : {false, true}) {
        for (const auto& r : rs) {
          const auto h = static_cast<size_t>(r.host);
          if (r.ready && hosts[h].up && !failed_[h] && (take_avoided || !avoided_[h])) {
            live.push_back(&r);
            total += r.share;
          }
        }
        if (!live.empty()) break;
      }
      // A replica passed over keeps pace with its share as if it had taken it: back from avoidance
      // it gets its share, not a burst to catch up on what the others took meanwhile.
      if (live.size() < rs.size()) {
        double all = 0;
        for (const auto& r : rs) all += r.share;
        for (const auto& r : rs) {
          const auto h = static_cast<size_t>(r.host);
          if (avoided_[h] && all > 0 && std::find(live.begin(), live.end(), &r) == live.end())
            sent_[{layer, e, r.host}] += static_cast<double>(pc.n) * r.share / all;
        }
      }
      if (live.empty() && wait_for_replica(layer, e)) {
        repinned = true;  // the coordinator re-placed the expert: redo this round on the new epoch
        break;
      }
      if (live.empty())
        return make_error(model_errc::io_error, "layer " + std::to_string(layer) + " expert " + std::to_string(e) +
                                                    " has no live replica" +
                                                    (f.last ? " (last failure: " + model::describe(f.last) + ")" : std::string()));
      if (live.size() == 1) {
        by_host[live[0]->host].push_back(pc);
        sent_[{layer, e, live[0]->host}] += static_cast<double>(pc.n);
        round_rows[live[0]->host] += static_cast<double>(pc.n);
        continue;
      }
      // Deficits: how far each replica is below its share of the rows sent to this expert under
      // this epoch. A piece too small to be worth splitting (an expert's weights cost as much to
      // read for a few rows as for one) goes whole to one replica: the one furthest below its
      // share, less the rows this round already gives its host (its queue in this layer). Larger
      // pieces are split over the replicas furthest behind, at least kMinSplitRows rows each, row
      // by row to the one furthest below its share (a smooth weighted round robin).
      std::vector<double*> sent;
      std::vector<double> share;
      double sum = 0;
      for (const auto* r : live) {
        sent.push_back(&sent_[{layer, e, r->host}]);
        sum += *sent.back();
        share.push_back(total > 0 ? r->share / total : 1.0 / static_cast<double>(live.size()));
      }
      std::vector<size_t> order(live.size());
      for (size_t k = 0; k < order.size(); ++k) order[k] = k;
      auto score = [&](size_t k) {
        return share[k] * (sum + static_cast<double>(pc.n)) - *sent[k] - round_rows[live[k]->host];
      };
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return score(a) > score(b); });
      const size_t parts = std::clamp<size_t>(static_cast<size_t>(pc.n / kMinSplitRows), 1, live.size());
      std::vector<int64_t> take(live.size(), 0);
      if (parts == 1) {
        take[order[0]] = pc.n;
        *sent[order[0]] += static_cast<double>(pc.n);
      } else {
        double part_share = 0;
        for (size_t j = 0; j < parts; ++j) part_share += share[order[j]];
        for (int64_t row = 0; row < pc.n; ++row) {
          sum += 1;
          size_t best = order[0];
          double best_deficit = -1e300;
          for (size_t j = 0; j < parts; ++j) {
            const size_t k = order[j];
            const double deficit = share[k] / part_share * sum - *sent[k];
            if (deficit > best_deficit) best = k, best_deficit = deficit;
          }
          *sent[best] += 1;
          ++take[best];
        }
      }
      int64_t off = pc.off;
      for (size_t k = 0; k < live.size(); ++k)
        if (take[k] > 0) {
          by_host[live[k]->host].push_back({pc.batch, off, take[k]});
          round_rows[live[k]->host] += static_cast<double>(take[k]);
          off += take[k];
        }
    }
    if (repinned) continue;
    // Every host of this round is asked at once; their answers are awaited together.
    auto& calls = f.calls;
    calls.reserve(by_host.size());
    for (auto& [h, pieces] : by_host) {
      auto& c = calls.emplace_back();
      c.host = h;
      c.pieces = pieces;
      size_t parts = 0;
      for (const auto& pc : pieces)
        parts += pc.n != static_cast<int64_t>(plan.batches[pc.batch].tokens.size()) ? 1 : 0;
      c.in_copy.reserve(parts);
      c.out_copy.reserve(parts);
      for (const auto& pc : pieces) {
        c.experts.push_back(plan.batches[pc.batch].expert);
        const auto whole = static_cast<int64_t>(plan.batches[pc.batch].tokens.size());
        if (pc.n == whole) {
          c.in.push_back(&inputs[pc.batch]);
          c.out.push_back(&outputs[pc.batch]);
        } else {
          const int64_t hidden = static_cast<int64_t>(inputs[pc.batch].size()) / whole;
          const auto* src = inputs[pc.batch].data() + pc.off * hidden;
          c.in_copy.emplace_back(src, src + pc.n * hidden);
          c.out_copy.emplace_back();
          c.in.push_back(&c.in_copy.back());
          c.out.push_back(&c.out_copy.back());
        }
      }
      const auto& hi = hosts[static_cast<size_t>(h)];
      auto& ch = channels_[hi.data_address];
      if (!ch) ch = connect_(hi);
      if (ch) {
        c.result = ch->call_async(layer, p.epoch, c.experts, c.in, c.out);
      } else {
        // Failed now, not only once this call is collected: the other micro-batch's round of this
        // step must not wait on a second connection attempt.
        channels_.erase(hi.data_address);
        fail_host(static_cast<size_t>(h), hi.data_address);
        std::promise<caf::error> unreachable;
        unreachable.set_value(model::make_error(model_errc::io_error, "cannot reach " + hi.name + " at " + hi.data_address));
        c.result = unreachable.get_future();
      }
    }
    pending.clear();
    return {};
  }
}

}  // namespace sy::actors
