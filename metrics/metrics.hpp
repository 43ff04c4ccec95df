#pragma once
/// Recording and exposing Switchyard's metrics (DESIGN.md §7). One registry per process (the
/// embedded cluster records every role into it; each process of a cluster, its own role); the
/// families are defined in families.cpp. This header is what the rest of the code includes: plain
/// functions and small handles, no prometheus-cpp types (they stay in registry.cpp).
///
/// Cost: recording a routed-token count is one relaxed atomic add; counters and gauges are atomics;
/// histograms take a short uncontended lock. With `options::enabled` false every call returns at
/// once (the serving benchmark's "metrics off").
///
/// Thread safety: every function may be called from any thread.
#include "metrics/families.hpp"

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sy::metrics {

/// How many per-(layer, expert) series exist (DeepSeek-V3: 58 × 256 = 14 848 per family).
struct per_expert_mode {
  enum class kind : uint8_t { all, top, off };
  kind k = kind::all;
  int top = 0;  ///< with `top`: the N hottest (layer, expert) pairs over all layers
  bool operator==(const per_expert_mode&) const = default;
};
/// Parses "all", "off" or "top:N" (1 ≤ N ≤ 1 000 000); nullopt otherwise.
[[nodiscard]] std::optional<per_expert_mode> parse_per_expert(std::string_view s);
[[nodiscard]] std::string to_string(per_expert_mode m);

struct options {
  bool enabled = true;  ///< false: recording calls return at once; /metrics shows what was recorded before
  per_expert_mode per_expert;
};
void configure(const options& o);
[[nodiscard]] options current_options();

/// The text exposition format (version 0.0.4), written by prometheus-cpp's TextSerializer, families
/// in catalogue order. Runs the scrape hooks first.
[[nodiscard]] std::string serialize();
inline constexpr std::string_view content_type = "text/plain; version=0.0.4; charset=utf-8";

/// The roles this process plays; a role's unlabelled series exist (at 0) from then on, so rates
/// over them are defined before the first event.
void declare_router();
void declare_coordinator();

// ---- router: HTTP front and batcher ----

/// One HTTP response: `route` is the request's path for the known routes, "other" for the rest.
void http_request(std::string_view route, int status, double seconds);
/// One finished sequence; `first_token_seconds` ≤ 0 when none was generated.
void sequence_finished(std::string_view reason, int64_t prompt_tokens, int64_t generated_tokens,
                       double first_token_seconds, double total_seconds);
void sequences(size_t running, size_t queued);
void engine_step();

// ---- router: expert dispatch ----

/// The model's MoE layers and experts per layer: sizes the routed-token table (call once per
/// model; the same shape again keeps the counts).
void expert_layout(const std::vector<int>& moe_layers, int experts);
/// `tokens` rows of `layer` sent to `expert` (ignored outside the layout).
void tokens_routed(int layer, int expert, uint64_t tokens);
void router_epoch(uint64_t epoch);
void router_retries(uint64_t total);

/// Cumulative routed tokens per (layer, expert) since the layout was set: `tokens[i * experts + e]`
/// for MoE layer `layers[i]`.
struct expert_load {
  std::vector<int> layers;
  int experts = 0;
  std::vector<uint64_t> tokens;
};
[[nodiscard]] expert_load routed_tokens();

/// p50/p99 (Prometheus' histogram_quantile interpolation) and count of an unlabelled histogram, or
/// of a labelled one summed over its label values.
struct quantiles {
  double p50 = 0, p99 = 0;
  uint64_t count = 0;
  double sum = 0;
};
[[nodiscard]] quantiles histogram_quantiles(family f, std::string_view only_label_value = {});
/// A counter's or gauge's value summed over all its series (0 when none; 0 for the coordinator's
/// families, which are only built at scrape time).
[[nodiscard]] double total(family f);

// ---- data-plane links (router and expert host) ----

/// A link's cumulative counters as the transport reports them.
struct link_counts {
  uint64_t bytes_sent = 0, bytes_received = 0;
  std::vector<std::pair<std::string, uint64_t>> errors;  ///< reason → count
};

/// Follows one link's counters into the `host`-labelled link families: read at every scrape and
/// once more when the watch ends, adding what grew since the last read (so a replaced link's
/// counts are kept). The reader must stay callable while the watch lives.
class link_watch {
 public:
  link_watch(std::string host, std::function<link_counts()> read);
  ~link_watch();
  link_watch(const link_watch&) = delete;
  link_watch& operator=(const link_watch&) = delete;
  struct state;

 private:
  std::shared_ptr<state> s_;
};

/// Router side: one request to `host` took `seconds` until its reply.
void host_round_trip(const std::string& host, double seconds);

// ---- expert hosts ----

/// An expert host's series; cheap to call per batch (no label lookup).
class host_metrics {
 public:
  explicit host_metrics(const std::string& host);
  /// One request: `segments` expert batches, `rows` token rows, computed in `seconds`.
  void request(uint64_t segments, uint64_t rows, double seconds) const;
  enum class refusal : uint8_t { not_held, down };
  /// A refused request (label reason="not_held" or "down").
  void refused(refusal why) const;
  void slots(size_t used, size_t total) const;
  struct handles;

 private:
  handles* h_;  ///< owned by the registry, lives as long as the process
};

// ---- coordinator ----

/// The coordinator's state as metrics see it; stored whole, exposed at the next scrape.
struct coordinator_view {
  uint64_t epoch = 0;
  std::vector<std::pair<std::string, bool>> hosts;  ///< name, up
  std::vector<int> layers;                          ///< MoE layers
  int experts = 0;
  std::vector<int> replicas;       ///< [i * experts + e]: ready replicas on hosts that are up
  std::vector<uint32_t> versions;  ///< [i * experts + e]: oldest ready version, 0 = none
  std::vector<double> load;        ///< [i * experts + e]: smoothed observed load (empty = none yet)
  std::vector<double> layer_balancedness;  ///< per MoE layer (empty = no load observed yet)
  double balancedness = 0;
  uint64_t rebalance_runs = 0, rebalance_moves = 0;
};
void coordinator(coordinator_view v);

// ---- scrape-time refresh ----

/// Runs `refresh` at the start of every `serialize()` while alive (to read values kept elsewhere,
/// e.g. the batcher's queue). The destructor waits for a running refresh.
class scrape_hook {
 public:
  explicit scrape_hook(std::function<void()> refresh);
  ~scrape_hook();
  scrape_hook(const scrape_hook&) = delete;
  scrape_hook& operator=(const scrape_hook&) = delete;

 private:
  uint64_t id_;
};

/// Sample lines (series) in an exposition text: lines that are neither empty nor comments.
[[nodiscard]] size_t count_series(std::string_view exposition);

namespace testing {
/// Tests only: an empty registry from now on (default options). Handles made before keep
/// recording into the old one, which is never freed.
void reset();
}  // namespace testing

}  // namespace sy::metrics
