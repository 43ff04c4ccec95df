// The process's metrics registry: prometheus-cpp families for the series recorded as events
// (requests, batches, latencies), and families built at scrape time from tables (tokens routed per
// (layer, expert), the coordinator's view), both written by prometheus-cpp's TextSerializer.
#include "metrics/metrics.hpp"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <set>

namespace sy::metrics {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

/// Tokens routed per (layer, expert): a fixed table of atomics per layout. A new layout replaces
/// the table; old tables are kept (a reader may still hold one), which costs one table per model
/// shape ever seen by the process.
struct token_table {
  std::vector<int> layers;
  int experts = 0;
  std::vector<int> row_of_layer;  ///< model layer → row, -1 for dense layers
  std::unique_ptr<std::atomic<uint64_t>[]> counts;
};

class registry_state {
 public:
  registry_state() {
    for (const auto& d : catalog()) {
      if (custom(d.id)) continue;
      const std::string name(d.name), help(d.help);
      switch (d.type) {
        case family_type::counter:
          counters_[idx(d.id)] = &prometheus::BuildCounter().Name(name).Help(help).Register(reg_);
          break;
        case family_type::gauge:
          gauges_[idx(d.id)] = &prometheus::BuildGauge().Name(name).Help(help).Register(reg_);
          break;
        case family_type::histogram:
          histograms_[idx(d.id)] = &prometheus::BuildHistogram().Name(name).Help(help).Register(reg_);
          break;
      }
    }
  }

  /// Families built at scrape time from tables rather than kept by prometheus-cpp.
  static bool custom(family f) {
    switch (f) {
      case family::expert_tokens_routed:
      case family::layer_tokens_routed:
      case family::placement_epoch:
      case family::hosts_registered:
      case family::hosts_up:
      case family::host_up:
      case family::expert_replicas:
      case family::layer_replicas:
      case family::expert_weight_version:
      case family::layer_weight_version_min:
      case family::layer_weight_version_max:
      case family::rebalance_runs:
      case family::rebalance_moves:
      case family::balancedness:
      case family::layer_balancedness:
        return true;
      default:
        return false;
    }
  }
  static size_t idx(family f) { return static_cast<size_t>(f); }

  bool on() const { return enabled_.load(std::memory_order_relaxed); }

  prometheus::Counter& counter(family f, const prometheus::Labels& l = {}) { return counters_[idx(f)]->Add(l); }
  prometheus::Gauge& gauge(family f, const prometheus::Labels& l = {}) { return gauges_[idx(f)]->Add(l); }
  prometheus::Histogram& histogram(family f, const prometheus::Labels& l = {}) {
    return histograms_[idx(f)]->Add(l, def(f).buckets);
  }
  prometheus::Family<prometheus::Counter>& counter_family(family f) { return *counters_[idx(f)]; }
  prometheus::Family<prometheus::Histogram>& histogram_family(family f) { return *histograms_[idx(f)]; }
  prometheus::Family<prometheus::Gauge>& gauge_family(family f) { return *gauges_[idx(f)]; }

  /// Unlabelled series, created once and cached (recording them then needs no lookup).
  prometheus::Counter& plain_counter(family f) { return *plain<prometheus::Counter>(f, [&] { return &counter(f); }); }
  prometheus::Gauge& plain_gauge(family f) { return *plain<prometheus::Gauge>(f, [&] { return &gauge(f); }); }
  prometheus::Histogram& plain_histogram(family f) {
    return *plain<prometheus::Histogram>(f, [&] { return &histogram(f); });
  }

  // ---- options ----
  void configure(const options& o) {
    std::lock_guard lock(mu_);
    opts_ = o;
    enabled_ = o.enabled;
  }
  options opts() const {
    std::lock_guard lock(mu_);
    return opts_;
  }

  // ---- routed tokens ----
  void layout(const std::vector<int>& moe_layers, int experts) {
    std::lock_guard lock(mu_);
    auto* cur = tokens_.load(std::memory_order_acquire);
    if (cur && cur->layers == moe_layers && cur->experts == experts) return;
    auto t = std::make_unique<token_table>();
    t->layers = moe_layers;
    t->experts = std::max(0, experts);
    int top = 0;
    for (int l : moe_layers) top = std::max(top, l + 1);
    t->row_of_layer.assign(static_cast<size_t>(top), -1);
    for (size_t i = 0; i < moe_layers.size(); ++i)
      if (moe_layers[i] >= 0) t->row_of_layer[static_cast<size_t>(moe_layers[i])] = static_cast<int>(i);
    const size_t n = moe_layers.size() * static_cast<size_t>(t->experts);
    t->counts = std::make_unique<std::atomic<uint64_t>[]>(n);
    for (size_t i = 0; i < n; ++i) t->counts[i].store(0, std::memory_order_relaxed);
    tokens_.store(t.get(), std::memory_order_release);
    tables_.push_back(std::move(t));
  }
  void routed(int layer, int expert, uint64_t n) {
    const auto* t = tokens_.load(std::memory_order_acquire);
    if (!t || layer < 0 || static_cast<size_t>(layer) >= t->row_of_layer.size() || expert < 0 || expert >= t->experts) return;
    const int row = t->row_of_layer[static_cast<size_t>(layer)];
    if (row < 0) return;
    t->counts[static_cast<size_t>(row) * static_cast<size_t>(t->experts) + static_cast<size_t>(expert)].fetch_add(
        n, std::memory_order_relaxed);
  }
  expert_load routed_snapshot() const {
    expert_load out;
    const auto* t = tokens_.load(std::memory_order_acquire);
    if (!t) return out;
    out.layers = t->layers;
    out.experts = t->experts;
    const size_t n = t->layers.size() * static_cast<size_t>(t->experts);
    out.tokens.resize(n);
    for (size_t i = 0; i < n; ++i) out.tokens[i] = t->counts[i].load(std::memory_order_relaxed);
    return out;
  }

  // ---- coordinator ----
  void set_coordinator(coordinator_view v) {
    std::lock_guard lock(mu_);
    coord_ = std::move(v);
  }
  bool has_coordinator() const {
    std::lock_guard lock(mu_);
    return coord_.has_value();
  }

  // ---- hosts ----
  host_metrics::handles* host(const std::string& name);

  // ---- scrape hooks ----
  uint64_t add_hook(std::function<void()> f) {
    std::lock_guard lock(hooks_mu_);
    hooks_[++next_hook_] = std::move(f);
    return next_hook_;
  }
  void remove_hook(uint64_t id) {
    std::lock_guard lock(hooks_mu_);  // waits for a scrape running the hooks
    hooks_.erase(id);
  }

  std::string serialize();

  std::mutex round_trip_mu;
  std::map<std::string, prometheus::Histogram*, std::less<>> round_trips;
  std::atomic<uint64_t> retries_seen{0};

 private:
  template <class T, class Make>
  T* plain(family f, Make make) {
    auto* p = plain_[idx(f)].load(std::memory_order_acquire);
    if (p) return static_cast<T*>(p);
    std::lock_guard lock(plain_mu_);
    p = plain_[idx(f)].load(std::memory_order_relaxed);
    if (!p) {
      p = make();
      plain_[idx(f)].store(p, std::memory_order_release);
    }
    return static_cast<T*>(p);
  }

  std::vector<MetricFamily> collect_custom();

  prometheus::Registry reg_;
  std::array<prometheus::Family<prometheus::Counter>*, family_count> counters_{};
  std::array<prometheus::Family<prometheus::Gauge>*, family_count> gauges_{};
  std::array<prometheus::Family<prometheus::Histogram>*, family_count> histograms_{};
  std::array<std::atomic<void*>, family_count> plain_{};
  std::mutex plain_mu_;

  std::atomic<bool> enabled_{true};
  mutable std::mutex mu_;
  options opts_;
  std::atomic<token_table*> tokens_{nullptr};
  std::vector<std::unique_ptr<token_table>> tables_;
  std::optional<coordinator_view> coord_;

  std::mutex hosts_mu_;
  std::map<std::string, std::unique_ptr<host_metrics::handles>, std::less<>> hosts_;

  std::mutex hooks_mu_;
  std::map<uint64_t, std::function<void()>> hooks_;
  uint64_t next_hook_ = 0;
};

/// One process-wide registry, never destroyed (threads may record during static destruction);
/// `testing::reset` swaps in a fresh one and leaks the old (handles may still point into it).
std::atomic<registry_state*> current{nullptr};
registry_state& reg() {
  auto* r = current.load(std::memory_order_acquire);
  if (r) return *r;
  static std::mutex first_mu;
  std::lock_guard lock(first_mu);
  r = current.load(std::memory_order_acquire);
  if (!r) {
    r = new registry_state();
    current.store(r, std::memory_order_release);
  }
  return *r;
}

ClientMetric sample(std::vector<std::pair<std::string_view, std::string>> labels, double v, family_type t) {
  ClientMetric m;
  for (auto& [k, val] : labels) m.label.push_back({std::string(k), std::move(val)});
  if (t == family_type::counter) m.counter.value = v;
  else m.gauge.value = v;
  return m;
}

MetricFamily make_family(family f) {
  const auto& d = def(f);
  MetricFamily mf;
  mf.name = std::string(d.name);
  mf.help = std::string(d.help);
  mf.type = d.type == family_type::counter ? MetricType::Counter : MetricType::Gauge;
  return mf;
}

}  // namespace

struct host_metrics::handles {
  prometheus::Counter* batches = nullptr;
  prometheus::Counter* rows = nullptr;
  prometheus::Histogram* duration = nullptr;
  prometheus::Gauge* slots = nullptr;
  prometheus::Gauge* used = nullptr;
  prometheus::Counter* refused_not_held = nullptr;
  prometheus::Counter* refused_down = nullptr;
};

namespace {

host_metrics::handles* registry_state::host(const std::string& name) {
  std::lock_guard lock(hosts_mu_);
  auto& h = hosts_[name];
  if (!h) {
    h = std::make_unique<host_metrics::handles>();
    const prometheus::Labels l{{"host", name}};
    h->batches = &counter(family::host_batches, l);
    h->rows = &counter(family::host_rows, l);
    h->duration = &histogram(family::host_batch_duration, l);
    h->slots = &gauge(family::host_slots, l);
    h->used = &gauge(family::host_slots_used, l);
    h->refused_not_held = &counter(family::host_batches_refused, {{"host", name}, {"reason", "not_held"}});
    h->refused_down = &counter(family::host_batches_refused, {{"host", name}, {"reason", "down"}});
  }
  return h.get();
}

/// The N hottest (layer, expert) pairs: by tokens routed in this process, else by the
/// coordinator's smoothed load, else the first N.
std::set<std::pair<int, int>> hottest(int n, const expert_load& routed, const std::optional<coordinator_view>& c) {
  std::vector<std::pair<double, std::pair<int, int>>> ranked;
  uint64_t total = 0;
  for (auto t : routed.tokens) total += t;
  if (total > 0) {
    for (size_t i = 0; i < routed.layers.size(); ++i)
      for (int e = 0; e < routed.experts; ++e)
        ranked.push_back({static_cast<double>(routed.tokens[i * static_cast<size_t>(routed.experts) + static_cast<size_t>(e)]),
                          {routed.layers[i], e}});
  } else if (c) {
    for (size_t i = 0; i < c->layers.size(); ++i)
      for (int e = 0; e < c->experts; ++e) {
        const size_t k = i * static_cast<size_t>(c->experts) + static_cast<size_t>(e);
        ranked.push_back({k < c->load.size() ? c->load[k] : 0.0, {c->layers[i], e}});
      }
  } else {
    for (size_t i = 0; i < routed.layers.size(); ++i)
      for (int e = 0; e < routed.experts; ++e) ranked.push_back({0.0, {routed.layers[i], e}});
  }
  // Hottest first; ties in (layer, expert) order, so the set is stable while nothing moves.
  std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::set<std::pair<int, int>> out;
  for (size_t i = 0; i < ranked.size() && static_cast<int>(i) < n; ++i) out.insert(ranked[i].second);
  return out;
}

std::vector<MetricFamily> registry_state::collect_custom() {
  std::vector<MetricFamily> out;
  const auto mode = opts().per_expert;
  const auto routed = routed_snapshot();
  std::optional<coordinator_view> c;
  {
    std::lock_guard lock(mu_);
    c = coord_;
  }
  std::set<std::pair<int, int>> hot;
  if (mode.k == per_expert_mode::kind::top) hot = hottest(mode.top, routed, c);
  auto keep = [&](int layer, int expert) {
    switch (mode.k) {
      case per_expert_mode::kind::all: return true;
      case per_expert_mode::kind::off: return false;
      case per_expert_mode::kind::top: return hot.count({layer, expert}) > 0;
    }
    return false;
  };
  auto push = [&](MetricFamily&& mf) {
    if (!mf.metric.empty()) out.push_back(std::move(mf));
  };

  if (!routed.layers.empty()) {
    auto per = make_family(family::expert_tokens_routed);
    auto layer = make_family(family::layer_tokens_routed);
    const size_t experts = static_cast<size_t>(routed.experts);
    for (size_t i = 0; i < routed.layers.size(); ++i) {
      const std::string l = std::to_string(routed.layers[i]);
      uint64_t sum = 0;
      for (size_t e = 0; e < experts; ++e) {
        const uint64_t v = routed.tokens[i * experts + e];
        sum += v;
        if (keep(routed.layers[i], static_cast<int>(e)))
          per.metric.push_back(sample({{"layer", l}, {"expert", std::to_string(e)}}, static_cast<double>(v), family_type::counter));
      }
      layer.metric.push_back(sample({{"layer", l}}, static_cast<double>(sum), family_type::counter));
    }
    push(std::move(per));
    push(std::move(layer));
  }

  if (c) {
    auto one = [&](family f, double v) {
      auto mf = make_family(f);
      mf.metric.push_back(sample({}, v, def(f).type));
      push(std::move(mf));
    };
    one(family::placement_epoch, static_cast<double>(c->epoch));
    one(family::hosts_registered, static_cast<double>(c->hosts.size()));
    int up = 0;
    auto host_up = make_family(family::host_up);
    for (auto& [name, is_up] : c->hosts) {
      up += is_up;
      host_up.metric.push_back(sample({{"host", name}}, is_up ? 1 : 0, family_type::gauge));
    }
    one(family::hosts_up, up);
    push(std::move(host_up));
    auto replicas = make_family(family::expert_replicas), layer_replicas = make_family(family::layer_replicas);
    auto version = make_family(family::expert_weight_version), vmin = make_family(family::layer_weight_version_min),
         vmax = make_family(family::layer_weight_version_max);
    const size_t experts = static_cast<size_t>(std::max(0, c->experts));
    for (size_t i = 0; i < c->layers.size(); ++i) {
      const std::string l = std::to_string(c->layers[i]);
      int sum = 0;
      uint32_t lo = std::numeric_limits<uint32_t>::max(), hi = 0;
      for (size_t e = 0; e < experts; ++e) {
        const size_t k = i * experts + e;
        const int r = k < c->replicas.size() ? c->replicas[k] : 0;
        const uint32_t v = k < c->versions.size() ? c->versions[k] : 0;
        sum += r;
        if (v > 0) lo = std::min(lo, v), hi = std::max(hi, v);
        if (keep(c->layers[i], static_cast<int>(e))) {
          replicas.metric.push_back(sample({{"layer", l}, {"expert", std::to_string(e)}}, r, family_type::gauge));
          version.metric.push_back(sample({{"layer", l}, {"expert", std::to_string(e)}}, v, family_type::gauge));
        }
      }
      layer_replicas.metric.push_back(sample({{"layer", l}}, sum, family_type::gauge));
      vmin.metric.push_back(sample({{"layer", l}}, hi > 0 ? lo : 0, family_type::gauge));
      vmax.metric.push_back(sample({{"layer", l}}, hi, family_type::gauge));
    }
    push(std::move(replicas));
    push(std::move(layer_replicas));
    push(std::move(version));
    push(std::move(vmin));
    push(std::move(vmax));
    one(family::rebalance_runs, static_cast<double>(c->rebalance_runs));
    one(family::rebalance_moves, static_cast<double>(c->rebalance_moves));
    // No load observed yet: no balancedness (a 0 would read as "maximally unbalanced").
    if (!c->layer_balancedness.empty()) {
      one(family::balancedness, c->balancedness);
      auto lb = make_family(family::layer_balancedness);
      for (size_t i = 0; i < c->layers.size() && i < c->layer_balancedness.size(); ++i)
        lb.metric.push_back(sample({{"layer", std::to_string(c->layers[i])}}, c->layer_balancedness[i], family_type::gauge));
      push(std::move(lb));
    }
  }
  return out;
}

std::string registry_state::serialize() {
  {
    std::lock_guard lock(hooks_mu_);
    for (auto& [id, f] : hooks_) f();
  }
  std::map<std::string, MetricFamily> by_name;
  for (auto& mf : reg_.Collect())
    if (!mf.metric.empty()) by_name[mf.name] = std::move(mf);
  for (auto& mf : collect_custom()) by_name[mf.name] = std::move(mf);
  std::vector<MetricFamily> ordered;
  for (const auto& d : catalog()) {
    auto it = by_name.find(std::string(d.name));
    if (it != by_name.end()) ordered.push_back(std::move(it->second));
  }
  return prometheus::TextSerializer().Serialize(ordered);
}

/// Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank; the
/// +Inf bucket answers with the highest finite bound.
double quantile(double q, const std::vector<ClientMetric::Bucket>& b) {
  if (b.empty()) return 0;
  const double total = static_cast<double>(b.back().cumulative_count);
  if (total <= 0) return 0;
  const double rank = q * total;
  double prev_bound = 0, prev_count = 0;
  for (const auto& k : b) {
    const double c = static_cast<double>(k.cumulative_count);
    if (c >= rank) {
      if (std::isinf(k.upper_bound)) return prev_bound;
      if (c == prev_count) return k.upper_bound;
      return prev_bound + (k.upper_bound - prev_bound) * (rank - prev_count) / (c - prev_count);
    }
    prev_bound = std::isinf(k.upper_bound) ? prev_bound : k.upper_bound;
    prev_count = c;
  }
  return prev_bound;
}

}  // namespace

// ---- options ----

std::optional<per_expert_mode> parse_per_expert(std::string_view s) {
  if (s == "all") return per_expert_mode{per_expert_mode::kind::all, 0};
  if (s == "off") return per_expert_mode{per_expert_mode::kind::off, 0};
  if (s.starts_with("top:")) {
    const auto num = s.substr(4);
    int n = 0;
    auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), n);
    if (ec == std::errc() && p == num.data() + num.size() && n >= 1 && n <= 1000000)
      return per_expert_mode{per_expert_mode::kind::top, n};
  }
  return std::nullopt;
}

std::string to_string(per_expert_mode m) {
  switch (m.k) {
    case per_expert_mode::kind::all: return "all";
    case per_expert_mode::kind::off: return "off";
    case per_expert_mode::kind::top: return "top:" + std::to_string(m.top);
  }
  return "all";
}

void configure(const options& o) { reg().configure(o); }
options current_options() { return reg().opts(); }
std::string serialize() { return reg().serialize(); }

void declare_router() {
  auto& r = reg();
  for (auto f : {family::prompt_tokens, family::generated_tokens, family::engine_steps, family::router_batch_retries})
    (void)r.plain_counter(f);
  for (auto f : {family::sequences_running, family::sequences_queued, family::router_placement_epoch}) (void)r.plain_gauge(f);
  for (auto f : {family::time_to_first_token, family::time_per_output_token}) (void)r.plain_histogram(f);
}

void declare_coordinator() {
  if (!reg().has_coordinator()) reg().set_coordinator({});
}

// ---- router ----

void http_request(std::string_view route, int status, double seconds) {
  auto& r = reg();
  if (!r.on()) return;
  const std::string rt(route);
  r.counter(family::http_requests, {{"route", rt}, {"status", std::to_string(status)}}).Increment();
  r.histogram(family::http_request_duration, {{"route", rt}}).Observe(seconds);
}

void sequence_finished(std::string_view reason, int64_t prompt_tokens, int64_t generated_tokens, double first_token_seconds,
                       double total_seconds) {
  auto& r = reg();
  if (!r.on()) return;
  r.counter(family::sequences_finished, {{"reason", std::string(reason)}}).Increment();
  r.plain_counter(family::prompt_tokens).Increment(static_cast<double>(std::max<int64_t>(0, prompt_tokens)));
  r.plain_counter(family::generated_tokens).Increment(static_cast<double>(std::max<int64_t>(0, generated_tokens)));
  if (generated_tokens > 0 && first_token_seconds > 0) {
    r.plain_histogram(family::time_to_first_token).Observe(first_token_seconds);
    if (generated_tokens > 1)
      r.plain_histogram(family::time_per_output_token)
          .Observe(std::max(0.0, total_seconds - first_token_seconds) / static_cast<double>(generated_tokens - 1));
  }
}

void sequences(size_t running, size_t queued) {
  auto& r = reg();
  if (!r.on()) return;
  r.plain_gauge(family::sequences_running).Set(static_cast<double>(running));
  r.plain_gauge(family::sequences_queued).Set(static_cast<double>(queued));
}

void engine_step() {
  auto& r = reg();
  if (!r.on()) return;
  r.plain_counter(family::engine_steps).Increment();
}

void expert_layout(const std::vector<int>& moe_layers, int experts) { reg().layout(moe_layers, experts); }

void tokens_routed(int layer, int expert, uint64_t tokens) {
  auto& r = reg();
  if (!r.on()) return;
  r.routed(layer, expert, tokens);
}

void router_epoch(uint64_t epoch) {
  auto& r = reg();
  if (!r.on()) return;
  r.plain_gauge(family::router_placement_epoch).Set(static_cast<double>(epoch));
}

void router_retries(uint64_t total) {
  auto& r = reg();
  if (!r.on()) return;
  // Several routers in one process (tests) each report their own total: count what grew.
  uint64_t seen = r.retries_seen.load();
  while (total > seen && !r.retries_seen.compare_exchange_weak(seen, total)) {
  }
  if (total > seen) r.plain_counter(family::router_batch_retries).Increment(static_cast<double>(total - seen));
}

expert_load routed_tokens() { return reg().routed_snapshot(); }

quantiles histogram_quantiles(family f, std::string_view only_label_value) {
  quantiles q;
  if (def(f).type != family_type::histogram || registry_state::custom(f)) return q;
  std::vector<ClientMetric::Bucket> sum;
  for (const auto& mf : reg().histogram_family(f).Collect())
    for (const auto& m : mf.metric) {
      if (!only_label_value.empty() &&
          std::none_of(m.label.begin(), m.label.end(), [&](const auto& l) { return l.value == only_label_value; }))
        continue;
      if (sum.empty()) sum = m.histogram.bucket;
      else
        for (size_t i = 0; i < sum.size() && i < m.histogram.bucket.size(); ++i)
          sum[i].cumulative_count += m.histogram.bucket[i].cumulative_count;
      q.count += m.histogram.sample_count;
      q.sum += m.histogram.sample_sum;
    }
  q.p50 = quantile(0.5, sum);
  q.p99 = quantile(0.99, sum);
  return q;
}

double total(family f) {
  const auto& d = def(f);
  if (d.type == family_type::histogram) return 0;
  if (f == family::expert_tokens_routed || f == family::layer_tokens_routed) {
    double s = 0;
    for (auto t : routed_tokens().tokens) s += static_cast<double>(t);
    return s;
  }
  if (registry_state::custom(f)) return 0;
  double s = 0;
  if (d.type == family_type::counter) {
    for (const auto& mf : reg().counter_family(f).Collect())
      for (const auto& m : mf.metric) s += m.counter.value;
  } else {
    for (const auto& mf : reg().gauge_family(f).Collect())
      for (const auto& m : mf.metric) s += m.gauge.value;
  }
  return s;
}

// ---- links ----

struct link_watch::state {
  std::string host;
  std::function<link_counts()> read;
  std::mutex mu;
  link_counts last;
  prometheus::Counter* sent = nullptr;
  prometheus::Counter* received = nullptr;
  std::map<std::string, prometheus::Counter*> errors;
  std::unique_ptr<scrape_hook> hook;

  void poll() {
    std::lock_guard lock(mu);
    auto now = read();
    if (!reg().on()) {
      last = std::move(now);
      return;
    }
    if (now.bytes_sent > last.bytes_sent) sent->Increment(static_cast<double>(now.bytes_sent - last.bytes_sent));
    if (now.bytes_received > last.bytes_received)
      received->Increment(static_cast<double>(now.bytes_received - last.bytes_received));
    for (auto& [reason, n] : now.errors) {
      uint64_t before = 0;
      for (auto& [r0, n0] : last.errors)
        if (r0 == reason) before = n0;
      if (n <= before) continue;
      auto& c = errors[reason];
      if (!c) c = &reg().counter(family::link_errors, {{"host", host}, {"reason", reason}});
      c->Increment(static_cast<double>(n - before));
    }
    last = std::move(now);
  }
};

link_watch::link_watch(std::string host, std::function<link_counts()> read) : s_(std::make_shared<state>()) {
  s_->host = std::move(host);
  s_->read = std::move(read);
  s_->sent = &reg().counter(family::link_sent_bytes, {{"host", s_->host}});
  s_->received = &reg().counter(family::link_received_bytes, {{"host", s_->host}});
  s_->hook = std::make_unique<scrape_hook>([s = s_.get()] { s->poll(); });
}

link_watch::~link_watch() {
  s_->hook.reset();  // no scrape polls it from now on
  s_->poll();        // what grew since the last scrape
}

void host_round_trip(const std::string& host, double seconds) {
  auto& r = reg();
  if (!r.on()) return;
  prometheus::Histogram* h;
  {
    std::lock_guard lock(r.round_trip_mu);
    auto& slot = r.round_trips[host];
    if (!slot) slot = &r.histogram(family::host_round_trip, {{"host", host}});
    h = slot;
  }
  h->Observe(seconds);
}

// ---- hosts ----

host_metrics::host_metrics(const std::string& host) : h_(reg().host(host)) {}

void host_metrics::request(uint64_t segments, uint64_t rows, double seconds) const {
  if (!reg().on()) return;
  h_->batches->Increment(static_cast<double>(segments));
  h_->rows->Increment(static_cast<double>(rows));
  h_->duration->Observe(seconds);
}

void host_metrics::refused(refusal why) const {
  if (!reg().on()) return;
  (why == refusal::not_held ? h_->refused_not_held : h_->refused_down)->Increment();
}

void host_metrics::slots(size_t used, size_t total) const {
  if (!reg().on()) return;
  h_->slots->Set(static_cast<double>(total));
  h_->used->Set(static_cast<double>(used));
}

// ---- coordinator ----

void coordinator(coordinator_view v) {
  if (!reg().on()) return;
  reg().set_coordinator(std::move(v));
}

// ---- hooks ----

scrape_hook::scrape_hook(std::function<void()> refresh) : id_(reg().add_hook(std::move(refresh))) {}
scrape_hook::~scrape_hook() { reg().remove_hook(id_); }

void testing::reset() { current.store(new registry_state(), std::memory_order_release); }

size_t count_series(std::string_view text) {
  size_t n = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    const auto line = text.substr(pos, end - pos);
    if (!line.empty() && line[0] != '#') ++n;
    pos = end + 1;
  }
  return n;
}

}  // namespace sy::metrics
