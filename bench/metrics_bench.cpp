// The cost of recording metrics on the serving path, per call (Google Benchmark), next to what one
// engine step of the serving benchmark does: the hooks a step runs, and a scrape of a
// DeepSeek-V3-sized registry (58 MoE layers x 256 experts, 32 hosts).
#include "metrics/metrics.hpp"

#include <benchmark/benchmark.h>

#include <string>
#include <vector>

namespace {

using namespace sy;

std::vector<int> layers(int first, int n) {
  std::vector<int> out;
  for (int l = 0; l < n; ++l) out.push_back(first + l);
  return out;
}

void BM_tokens_routed(benchmark::State& st) {
  metrics::expert_layout(layers(0, 8), 8);
  int e = 0;
  for (auto _ : st) {
    metrics::tokens_routed(3, e, 5);
    e = (e + 1) & 7;
  }
}
BENCHMARK(BM_tokens_routed)->Threads(1)->Threads(2);

void BM_host_request(benchmark::State& st) {
  metrics::host_metrics h("bench-host-" + std::to_string(st.thread_index()));
  for (auto _ : st) h.request(2, 16, 0.0004);
}
BENCHMARK(BM_host_request)->Threads(1)->Threads(2);

void BM_sequence_finished(benchmark::State& st) {
  for (auto _ : st) metrics::sequence_finished("length", 64, 64, 0.2, 1.4);
}
BENCHMARK(BM_sequence_finished);

void BM_http_request(benchmark::State& st) {
  for (auto _ : st) metrics::http_request("/v1/completions", 200, 1.5);
}
BENCHMARK(BM_http_request);

/// One engine step of bench/serve_bench.sh's model (8 MoE layers, top-2 of 8, 4 hosts) with a
/// batch that touches every expert: what the hooks of a step cost together.
void BM_step_hooks(benchmark::State& st) {
  metrics::expert_layout(layers(0, 8), 8);
  std::vector<metrics::host_metrics> hosts;
  for (int h = 0; h < 4; ++h) hosts.emplace_back("step-host-" + std::to_string(h));
  for (auto _ : st) {
    metrics::sequences(32, 0);
    metrics::engine_step();
    for (int l = 0; l < 8; ++l) {
      for (int e = 0; e < 8; ++e) metrics::tokens_routed(l, e, 8);
      for (auto& h : hosts) h.request(2, 16, 0.0004);
    }
  }
}
BENCHMARK(BM_step_hooks);

void BM_scrape_deepseek_v3(benchmark::State& st) {
  const auto moe = layers(3, 58);
  metrics::expert_layout(moe, 256);
  for (int l : moe)
    for (int e = 0; e < 256; ++e) metrics::tokens_routed(l, e, 1 + static_cast<uint64_t>((l * 31 + e * 17) % 97));
  metrics::coordinator_view v;
  v.layers = moe;
  v.experts = 256;
  v.replicas.assign(58 * 256, 1);
  v.versions.assign(58 * 256, 1);
  for (int h = 0; h < 32; ++h) {
    v.hosts.emplace_back("host-" + std::to_string(h), true);
    metrics::host_metrics("host-" + std::to_string(h)).request(1, 1, 0.001);
  }
  metrics::coordinator(v);
  metrics::configure({true, *metrics::parse_per_expert(st.range(0) ? "all" : "top:64")});
  size_t series = 0;
  for (auto _ : st) {
    auto text = metrics::serialize();
    series = metrics::count_series(text);
    benchmark::DoNotOptimize(text);
  }
  st.counters["series"] = static_cast<double>(series);
  metrics::configure({});
}
BENCHMARK(BM_scrape_deepseek_v3)->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
