#pragma once
/// The router's own dashboard, for operators without Grafana: `GET /dashboard` is one
/// self-contained HTML page (inline script and style, no external requests) that polls
/// `GET /dashboard/data` every few seconds and draws the expert-load heatmap (layer × expert), the
/// replicas per expert, the hottest experts, latency (TTFT, TPOT, end to end: p50/p99) and
/// throughput.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sy::api {

/// The router's view of the cluster: its current placement.
struct cluster_view {
  uint64_t epoch = 0;
  int hosts = 0, hosts_up = 0;
  std::vector<int> layers;    ///< MoE layers
  int experts = 0;
  std::vector<int> replicas;  ///< [i * experts + e]: ready replicas on hosts that are up
};

[[nodiscard]] std::string_view dashboard_page();

/// JSON: {"model", "time", "epoch", "hosts", "hosts_up", "layers", "experts",
/// "tokens": [[cumulative routed tokens per expert] per MoE layer], "replicas": [[…]],
/// "latency": {"ttft"|"tpot"|"e2e": {"p50", "p99", "count"}} (seconds, since start),
/// "prompt_tokens", "generated_tokens", "requests", "running", "queued"}.
[[nodiscard]] std::string dashboard_data(const std::string& model, const cluster_view& view);

}  // namespace sy::api
