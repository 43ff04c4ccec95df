// MoE layer benchmark: one routed-expert layer at real model shapes on this CPU, printed next to the
// same run's limits: a plain OpenBLAS sgemm rate (compute) and a large memcpy bandwidth (memory).
//
//   bench_moe_layer [--weights bf16|f32] [--shapes mixtral,qwen3] [google-benchmark flags]
//
// Targets (issue 2): at 512 tokens the expert compute reaches 80% of the sgemm rate; at 1 and 8
// tokens its time is within 1.5x of (expert weight bytes read / memcpy bandwidth).
#include "model/gating.hpp"
#include "model/kernels.hpp"
#include "model/moe.hpp"

#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace m = sy::model;

namespace {

struct layer_shape {
  std::string name;
  int64_t hidden, ffn;
  int experts, top_k;
};

const std::vector<layer_shape> all_shapes = {
    {"mixtral", 4096, 14336, 8, 2},  // Mixtral-8x7B
    {"qwen3", 2048, 768, 128, 8},    // Qwen3-30B-A3B
};

m::dtype weight_type = m::dtype::bf16;
double sgemm_gflops = 0, memcpy_gbs = 0;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void fill_random(float* p, size_t n, uint64_t seed, float scale) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < static_cast<int64_t>((n + 65535) / 65536); ++c) {
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(c) * 0xbf58476d1ce4e5b9ull + 1;
    for (size_t i = static_cast<size_t>(c) * 65536; i < std::min(n, static_cast<size_t>(c + 1) * 65536); ++i) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      p[i] = (static_cast<float>(s >> 40) * (1.0f / 16777216.0f) * 2 - 1) * scale;
    }
  }
}

m::matrix random_matrix(m::dtype t, int64_t rows, int64_t cols, uint64_t seed, float scale) {
  m::matrix w(m::dtype::f32, rows, cols);
  fill_random(w.f32(), static_cast<size_t>(rows * cols), seed, scale);
  if (t == m::dtype::f32) return w;
  m::matrix b(m::dtype::bf16, rows, cols);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows * cols; ++i) b.bf16()[i] = m::f32_to_bf16(w.f32()[i]);
  return b;
}

/// One layer's weights, built once per shape.
struct layer {
  layer_shape shape;
  m::gating_config gating;
  m::matrix router;
  std::vector<m::layer_experts> experts{1};
};

layer& get_layer(const layer_shape& s) {
  static std::map<std::string, std::unique_ptr<layer>> cache;
  auto& slot = cache[s.name];
  if (slot) return *slot;
  cache.clear();  // one shape in memory at a time
  auto& l = cache[s.name];
  l = std::make_unique<layer>();
  l->shape = s;
  l->gating.num_experts = s.experts;
  l->gating.top_k = s.top_k;
  l->gating.norm_topk_prob = true;
  l->router = random_matrix(m::dtype::f32, s.experts, s.hidden, 1, 0.05f);
  for (int e = 0; e < s.experts; ++e) {
    auto w = std::make_unique<m::expert_weights>();
    w->gate_up = random_matrix(weight_type, 2 * s.ffn, s.hidden, 100 + static_cast<uint64_t>(e), 0.02f);
    w->down = random_matrix(weight_type, s.hidden, s.ffn, 200 + static_cast<uint64_t>(e), 0.02f);
    w->pack();  // as the loader does for bf16 weights
    l->experts[0].experts.push_back(std::move(w));
  }
  return *l;
}

struct result {
  std::string shape;
  int64_t tokens;
  double ms, gflops, gbs, weight_gb;
};
std::map<std::pair<std::string, int64_t>, result> results;

void bm_layer(benchmark::State& state, layer_shape shape) {
  auto& l = get_layer(shape);
  const int64_t t = state.range(0), h = shape.hidden;
  std::vector<float> x(static_cast<size_t>(t * h)), y(x.size());
  fill_random(x.data(), x.size(), 7, 1.0f);
  m::local_expert_executor exec(&l.experts);
  double flops = 0, bytes = 0;
  for (auto _ : state) {
    auto r = m::gate(l.gating, l.router, nullptr, x.data(), t);
    auto plan = m::plan_dispatch(r, shape.experts);
    std::vector<std::vector<float>> in, out;
    m::gather_rows(plan, x.data(), h, in);
    if (auto e = exec.run(0, plan, in, out)) state.SkipWithError("expert executor failed");
    std::fill(y.begin(), y.end(), 0.0f);
    m::combine(plan, out, h, y.data());
    benchmark::DoNotOptimize(y.data());
    flops = 0;
    bytes = 0;
    for (auto& b : plan.batches) {
      flops += 2.0 * static_cast<double>(b.tokens.size()) * 3.0 * static_cast<double>(h * shape.ffn);
      bytes += static_cast<double>(l.experts[0].experts[static_cast<size_t>(b.expert)]->bytes());
    }
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_MB"] = bytes * 1e-6;
  results[{shape.name, t}] = {shape.name, t, 0, flops, bytes, 0};
}

/// Measures both limits, keeping the best value seen over all calls (this VM's speed drifts; the
/// best is the bar the layer is held to).
void measure_limits() {
  // sgemm: 2048³ f32, best of 5, OpenBLAS threaded over every core (the library at its best).
  const int n = 2048;
  std::vector<float> a(static_cast<size_t>(n) * n), b(a.size()), c(a.size());
  fill_random(a.data(), a.size(), 1, 1);
  fill_random(b.data(), b.size(), 2, 1);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::min(best, seconds_since(t0));
  }
  sgemm_gflops = std::max(sgemm_gflops, 2.0 * n * n * n / best * 1e-9);
  // memcpy: 1 GiB, best of 5, bytes copied per second (OpenMP threads split the copy).
  const size_t bytes = size_t{1} << 30;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  best = 1e30;
  for (int i = 0; i < 5; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    const int64_t chunks = 64;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < chunks; ++k)
      std::memcpy(dst.data() + static_cast<size_t>(k) * (bytes / chunks), src.data() + static_cast<size_t>(k) * (bytes / chunks), bytes / chunks);
    best = std::min(best, seconds_since(t0));
  }
  memcpy_gbs = std::max(memcpy_gbs, static_cast<double>(bytes) / best * 1e-9);
}

}  // namespace

int main(int argc, char** argv) {
  std::string shapes = "mixtral,qwen3";
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--weights" && i + 1 < argc) {
      weight_type = std::string(argv[++i]) == "f32" ? m::dtype::f32 : m::dtype::bf16;
    } else if (a == "--shapes" && i + 1 < argc) {
      shapes = argv[++i];
    } else {
      rest.push_back(argv[i]);
    }
  }
  int rc = static_cast<int>(rest.size());
  benchmark::Initialize(&rc, rest.data());
  m::set_kernel_threads(0);
  measure_limits();
  std::printf("limits (same run, %d threads): OpenBLAS sgemm 2048^3 %.1f GFLOP/s, memcpy 1 GiB %.1f GB/s; weights %s\n",
              omp_get_max_threads(), sgemm_gflops, memcpy_gbs, m::dtype_name(weight_type));
  for (const auto& s : all_shapes) {
    if (shapes.find(s.name) == std::string::npos) continue;
    benchmark::RegisterBenchmark(("moe_layer/" + s.name).c_str(), bm_layer, s)
        ->Arg(1)->Arg(8)->Arg(64)->Arg(512)
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.5)
        ->UseRealTime();
  }
  struct collect : benchmark::ConsoleReporter {
    void ReportRuns(const std::vector<Run>& runs) override {
      ConsoleReporter::ReportRuns(runs);
      for (auto& r : runs) {
        // "moe_layer/<shape>/<tokens>/min_time:…"
        std::vector<std::string> parts;
        std::string name = r.benchmark_name();
        for (size_t a = 0, b; a <= name.size(); a = b + 1) {
          b = name.find('/', a);
          if (b == std::string::npos) b = name.size();
          parts.push_back(name.substr(a, b - a));
        }
        if (parts.size() < 3) continue;
        auto& res = results[{parts[1], std::stoll(parts[2])}];
        res.ms = r.GetAdjustedRealTime();
      }
    }
  } reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  measure_limits();  // again after the runs: the limits are the best of before and after
  std::printf("\nlimits, best of before and after: sgemm %.1f GFLOP/s, memcpy %.1f GB/s\n", sgemm_gflops, memcpy_gbs);
  std::printf("\n%-8s %6s %10s %10s %10s | %12s %8s | %14s %8s\n", "layer", "tokens", "time ms", "GFLOP/s",
              "weight GB/s", "vs sgemm", "target", "bytes/bw ms", "ratio");
  for (auto& [key, r] : results) {
    if (r.ms <= 0) continue;
    const double gflops = r.gflops / (r.ms * 1e-3) * 1e-9 * 1e0;
    const double gbs = r.gbs / (r.ms * 1e-3) * 1e-9;
    const double bound_ms = r.gbs / (memcpy_gbs * 1e9) * 1e3;
    std::printf("%-8s %6lld %10.2f %10.1f %10.1f | %11.0f%% %8s | %14.2f %7.2fx\n", r.shape.c_str(),
                static_cast<long long>(r.tokens), r.ms, gflops, gbs, 100 * gflops / sgemm_gflops,
                r.tokens >= 512 ? ">=80%" : "", bound_ms, r.ms / bound_ms);
  }
  std::printf("(ratio = time / (weight bytes read / memcpy bandwidth); target <= 1.5x at 1 and 8 tokens)\n");
  benchmark::Shutdown();
  return 0;
}
