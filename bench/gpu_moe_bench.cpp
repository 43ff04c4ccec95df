// GPU MoE layer benchmark (needs a CUDA device): Mixtral-8x7B- and Qwen3-30B-A3B-shaped layers at
// 1 to 4096 tokens, next to the device's roofline measured in the same run (a large device-to-device
// copy, a large cuBLAS bf16 GEMM) and, when given, Hugging Face transformers' own MoE block timed in
// the same job (bench/gpu/hf_moe_block.py writes that JSON).
//
//   bench_gpu_moe [--hf-json FILE] [--reps N] [--layer mixtral|qwen3] [--tokens 1,8,...] [--gemv-sweep]
//                 [--modes auto,fused/c2,...] [--router-bf16] [--profile]
//
// --gemv-sweep adds, at up to 8 tokens, the GEMV path under every `gemv_tuning` (rows per warp of
// each kernel or `auto`, per-expert unrolling, dependent launch off), labelled
// gemv/GU.DN[.split][.nopdl]. --modes keeps only the variants named (auto, grouped, each, padded,
// gemv, fused, fused/c1, fused/c2, fused/host, auto/host, auto/nopdl, auto/sgemm, auto/pieces). --router-bf16
// rounds the router's weights to bf16, as a bf16 checkpoint stores them (automatic then takes the
// router GEMM in bf16 pieces on large fused steps). --profile brackets the last forward of each run
// with cudaProfilerStart/Stop (for `ncu --profile-from-start off`).
//
// Targets: at 1–8 tokens within 1.3x of (expert weight bytes read / copy bandwidth); at 4096 tokens
// >= 70% of the bf16 GEMM rate.
#include "model/cuda/gpu_moe.hpp"

#include <cuda_profiler_api.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace m = sy::model;
namespace gpu = sy::model::cuda;

namespace {

struct shape {
  std::string name;
  int64_t hidden, ffn;
  int experts, top_k;
};

std::vector<float> randv(size_t n, uint32_t seed, float scale) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = (static_cast<float>(s >> 40) * (1.0f / 16777216.0f) * 2 - 1) * scale;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::string hf_json, only_layer, only_modes;
  int reps = 20;
  bool sweep = false;
  bool profile = false;  // the last forward of each run between cudaProfilerStart and Stop (ncu --profile-from-start off)
  bool router_bf16 = false;  // the router's weights rounded to bf16 (as a bf16 checkpoint stores them)
  std::vector<int64_t> tokens = {1, 2, 4, 8, 64, 512, 4096};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--hf-json" && i + 1 < argc) hf_json = argv[++i];
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--layer" && i + 1 < argc) only_layer = argv[++i];
    else if (a == "--modes" && i + 1 < argc) only_modes = "," + std::string(argv[++i]) + ",";
    else if (a == "--profile") profile = true;
    else if (a == "--router-bf16") router_bf16 = true;
    else if (a == "--gemv-sweep") sweep = true;
    else if (a == "--tokens" && i + 1 < argc) {
      tokens.clear();
      for (std::string v = argv[++i]; !v.empty();) {
        const auto c = v.find(',');
        tokens.push_back(std::atoll(v.substr(0, c).c_str()));
        v = c == std::string::npos ? "" : v.substr(c + 1);
      }
    }
  }
  std::string why;
  if (!gpu::device_available(&why)) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", why.c_str());
    return 77;
  }
  nlohmann::json hf;
  if (!hf_json.empty()) {
    std::ifstream in(hf_json);
    hf = nlohmann::json::parse(in, nullptr, false);
    if (hf.is_discarded()) hf = nlohmann::json::object();
  }
  auto roof = gpu::measure_roofline(0);
  if (!roof) {
    std::printf("error: %s\n", m::describe(roof.error()).c_str());
    return 1;
  }
  std::printf("device: %s\n", gpu::device_description(0).c_str());
  std::printf("roofline (same run): device-to-device copy %.0f GB/s (read + write), cuBLAS bf16 GEMM 8192^3 %.0f TFLOP/s\n",
              roof->copy_gbs, roof->bf16_tflops);
  const std::vector<shape> shapes = {{"mixtral", 4096, 14336, 8, 2}, {"qwen3", 2048, 768, 128, 8}};
  std::printf("\n%-8s %-18s %6s %7s %10s %9s %10s %10s %9s %9s | %8s %8s %17s | %11s %7s | %8s %7s\n", "layer", "gemm", "tokens",
              "active", "median ms", "device ms", "weight GB", "GB/s", "TFLOP/s", "vs GEMM", "exp ms", "exp/GEMM", "pre(route)/post",
              "bytes/bw ms", "ratio", "HF ms", "HF/ours");
  for (const auto& s : shapes) {
    if (!only_layer.empty() && s.name != only_layer) continue;
    m::gating_config g;
    g.num_experts = s.experts;
    g.top_k = s.top_k;
    g.norm_topk_prob = true;
    auto router = m::matrix::from_f32(router_bf16 ? m::dtype::bf16 : m::dtype::f32, randv(size_t(s.experts * s.hidden), 1, 0.05f), s.experts, s.hidden);
    std::vector<m::expert_weights> store;
    for (int e = 0; e < s.experts; ++e) {
      m::expert_weights w;
      w.gate_up = m::matrix::from_f32(m::dtype::bf16, randv(size_t(2 * s.ffn * s.hidden), 100 + e, 0.02f), 2 * s.ffn, s.hidden);
      w.down = m::matrix::from_f32(m::dtype::bf16, randv(size_t(s.hidden * s.ffn), 200 + e, 0.02f), s.hidden, s.ffn);
      store.push_back(std::move(w));
    }
    std::vector<const m::expert_weights*> ptrs;
    for (auto& w : store) ptrs.push_back(&w);
    auto layer = gpu::gpu_moe_layer::make(0, g, router, nullptr, ptrs);
    if (!layer) {
      std::printf("error: %s\n", m::describe(layer.error()).c_str());
      return 1;
    }
    store.clear();  // host copies no longer needed
    (*layer)->set_timing(true);
    struct variant {
      gpu::gemm_mode mode;
      gpu::gemv_tuning tuning;
      std::string label;
      bool device_plan = true;
      gpu::fused_tuning fused = {};
      gpu::gpu_moe_layer::router_gemm router = gpu::gpu_moe_layer::router_gemm::automatic;
    };
    std::vector<variant> variants;
    for (auto mode : {gpu::gemm_mode::automatic, gpu::gemm_mode::grouped, gpu::gemm_mode::per_expert,
                      gpu::gemm_mode::padded, gpu::gemm_mode::gemv, gpu::gemm_mode::fused})
      variants.push_back({mode, {}, gpu::to_string(mode)});
    // The fused kernels' cluster sizes forced (plain `fused` picks one and says which), and the
    // fused path with its tile list made on the host after the counts' round trip (the default
    // makes it on the device where the step takes `fused` whatever its counts).
    variants.push_back({gpu::gemm_mode::fused, {}, "fused/c1", true, {1}});
    variants.push_back({gpu::gemm_mode::fused, {}, "fused/c2", true, {2}});
    variants.push_back({gpu::gemm_mode::fused, {}, "fused/host", false});
    variants.push_back({gpu::gemm_mode::automatic, {}, "auto/host", false});
    // A large step's kernels, from the gating to the combine, each launched only once the one
    // before it completed (no programmatic dependent launch).
    variants.push_back({gpu::gemm_mode::automatic, {}, "auto/nopdl", true, {0, false}});
    // The router GEMM of large steps forced to f32 (cublasSgemm) or to bf16 pieces.
    variants.push_back({gpu::gemm_mode::automatic, {}, "auto/sgemm", true, {}, gpu::gpu_moe_layer::router_gemm::f32});
    variants.push_back({gpu::gemm_mode::automatic, {}, "auto/pieces", true, {}, gpu::gpu_moe_layer::router_gemm::bf16_pieces});
    if (sweep) {
      for (bool split : {false, true}) {
        for (int gu : {0, 4, 8})
          for (int dn : {0, 2, 4, 8}) {
            if ((gu == 0) != (dn == 0)) continue;
            variants.push_back({gpu::gemm_mode::gemv, {gu, dn, true, split},
                                "gemv/" + (gu == 0 ? std::string("auto") : std::to_string(gu) + "." + std::to_string(dn)) +
                                    (split ? ".split" : "")});
          }
        variants.push_back({gpu::gemm_mode::gemv, {0, 0, false, split}, std::string("gemv/auto") + (split ? ".split" : "") + ".nopdl"});
      }
    }
    // Input set i of t tokens (the same seed for the same i), in and out buffers on the device.
    auto device_io = [&](int64_t t, int i) -> std::optional<std::pair<float*, float*>> {
      auto x = randv(size_t(t * s.hidden), 7 + i, 1.0f);
      auto dx = (*layer)->device_alloc(x.size());
      auto dy = (*layer)->device_alloc(x.size());
      if (!dx || !dy || (*layer)->upload(*dx, x.data(), x.size())) return std::nullopt;
      return std::pair{*dx, *dy};
    };
    std::map<int64_t, std::pair<double, double>> auto_ms_bytes;  // `auto` at each token count: median ms, mean bytes
    for (int64_t t : tokens)
     for (const auto& v : variants) {
      const auto mode = v.mode;
      if (mode == gpu::gemm_mode::gemv && t > gpu::gemv_max_rows) continue;
      if (!only_modes.empty() && only_modes.find("," + v.label + ",") == std::string::npos) continue;
      (*layer)->set_gemm_mode(mode);
      (*layer)->set_gemv_tuning(v.tuning);
      (*layer)->set_device_plan(v.device_plan);
      (*layer)->set_fused_tuning(v.fused);
      (*layer)->set_router_gemm(v.router);
      // Several input sets, rotated, so repeated runs do not measure one cached input.
      constexpr int sets = 3;
      std::vector<float*> xs, ys;
      for (int i = 0; i < sets; ++i) {
        auto io = device_io(t, i);
        if (!io) {
          std::printf("error: device allocation failed\n");
          return 1;
        }
        xs.push_back(io->first);
        ys.push_back(io->second);
      }
      for (int i = 0; i < 3; ++i)
        if (auto e = (*layer)->forward_device(xs[size_t(i % sets)], t, ys[size_t(i % sets)])) {
          std::printf("error: %s\n", m::describe(e).c_str());
          return 1;
        }
      // Forward i (input set i % sets) to completion; false (said) on an error.
      auto forward = [&](int i) {
        auto e = (*layer)->forward_device(xs[size_t(i % sets)], t, ys[size_t(i % sets)]);
        if (!e) e = (*layer)->synchronize();
        if (e) std::printf("error: %s\n", m::describe(e).c_str());
        return !e;
      };
      std::vector<double> ms, dev_ms, exp_ms, pre_ms, post_ms, route_ms;
      double bytes = 0;
      int active = 0;
      for (int i = 0; i < reps; ++i) {
        const bool profiled = profile && i == reps - 1;
        if (profiled) cudaProfilerStart();
        if (!forward(i)) return 1;
        if (profiled) cudaProfilerStop();
        auto d = (*layer)->last_device_ms();
        dev_ms.push_back(d ? *d : -1.0);
        auto ph = (*layer)->last_phases();
        exp_ms.push_back(ph ? ph->experts : -1.0);
        pre_ms.push_back(ph ? ph->before : -1.0);
        post_ms.push_back(ph ? ph->after : -1.0);
        route_ms.push_back(ph ? ph->routing : -1.0);
        bytes += static_cast<double>((*layer)->last_weight_bytes());
        active += (*layer)->last_active_experts();
      }
      // The layer's time as served: the same forwards without the phase events, which would keep
      // kernels launched to overlap their predecessor (programmatic dependent launch) from doing so.
      (*layer)->set_timing(false);
      for (int i = 0; i < reps; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        if (!forward(i)) return 1;
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      (*layer)->set_timing(true);
      auto median = [](std::vector<double>& v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      const double med = median(ms), dev_med = median(dev_ms), exp_med = median(exp_ms);
      const double pre_med = median(pre_ms), post_med = median(post_ms), route_med = median(route_ms);
      bytes /= reps;
      const double flops = 2.0 * 3.0 * double(s.hidden) * double(s.ffn) * double(t) * s.top_k;
      const double tflops = flops / (med * 1e-3) * 1e-12;
      // Weights are read once: the bound counts reads only, against a copy rate that counts read + write.
      const double bound_ms = bytes / (roof->copy_gbs * 1e9) * 1e3;
      double hf_ms = 0;
      const std::string key = s.name + "/" + std::to_string(t);
      if (hf.contains(key) && hf[key].is_number()) hf_ms = hf[key].get<double>();
      char hfcol[64] = "-", ratio[64] = "-";
      if (hf_ms > 0) {
        std::snprintf(hfcol, sizeof hfcol, "%.3f", hf_ms);
        std::snprintf(ratio, sizeof ratio, "%.2fx", hf_ms / med);
      }
      char expcol[32] = "-", expratio[32] = "-", prepost[48] = "-";  // not on the GEMV path
      if (exp_med > 0) {
        std::snprintf(prepost, sizeof prepost, "%.3f(%.3f)/%.3f", pre_med, route_med, post_med);
        std::snprintf(expcol, sizeof expcol, "%.3f", exp_med);
        std::snprintf(expratio, sizeof expratio, "%.0f%%", 100 * flops / (exp_med * 1e-3) * 1e-12 / roof->bf16_tflops);
      }
      std::string kind = v.label;
      const bool ran_fused = (*layer)->last_gemm_mode() == gpu::gemm_mode::fused;
      if (mode == gpu::gemm_mode::automatic) {
        kind += std::string("=") + gpu::to_string((*layer)->last_gemm_mode());
        if ((*layer)->last_device_planned()) kind += "/dev";
        if (ran_fused) kind += "/c" + std::to_string((*layer)->last_fused_cluster());
        auto_ms_bytes[t] = {med, bytes};
      } else if (v.label == "fused" && ran_fused) {
        kind += "=c" + std::to_string((*layer)->last_fused_cluster());
      }
      std::printf("%-8s %-18s %6lld %7.1f %10.3f %9.3f %10.2f %10.0f %9.1f %8.0f%% | %8s %8s %17s | %11.3f %6.2fx | %8s %7s\n",
                  s.name.c_str(), kind.c_str(), static_cast<long long>(t), double(active) / reps, med, dev_med, bytes * 1e-9,
                  bytes / (med * 1e-3) * 1e-9, tflops, 100 * tflops / roof->bf16_tflops, expcol, expratio, prepost, bound_ms,
                  med / bound_ms, hfcol, ratio);
    }
    // The same-bytes read: one kernel that only reads the weights of the experts a forward used,
    // timed like the forward (host clock around the launch and its synchronisation). Any
    // implementation pays at least this for those bytes, launch and ramp-up included; the copy
    // bound above is the steady rate of a 2 GiB copy.
    bool header = false;
    for (const auto& [t, ours] : auto_ms_bytes) {
      if (t > gpu::gemv_max_rows) continue;
      (*layer)->set_gemm_mode(gpu::gemm_mode::automatic);
      (*layer)->set_gemv_tuning({});
      constexpr int tables = 3;  // three routings, rotated like the forward's inputs
      std::vector<size_t> tbytes;
      for (int i = 0; i < tables; ++i) {
        auto io = device_io(t, i);
        if (!io) {
          std::printf("error: device allocation failed\n");
          return 1;
        }
        if (auto e = (*layer)->forward_device(io->first, t, io->second)) {
          std::printf("error: %s\n", m::describe(e).c_str());
          return 1;
        }
        auto b = (*layer)->prepare_read_baseline(i);
        if (!b) {
          std::printf("error: %s\n", m::describe(b.error()).c_str());
          return 1;
        }
        tbytes.push_back(*b);
      }
      double best_gbs = 0;
      int best_bps = 0;
      for (int bps : {0, 4, 8, 16}) {
        for (int i = 0; i < tables; ++i)
          if ((*layer)->read_baseline(i, bps) || (*layer)->synchronize()) {
            std::printf("error: read baseline failed\n");
            return 1;
          }
        std::vector<double> gbs;
        for (int i = 0; i < reps; ++i) {
          const int tab = i % tables;
          auto t0 = std::chrono::steady_clock::now();
          if (auto e = (*layer)->read_baseline(tab, bps)) {
            std::printf("error: %s\n", m::describe(e).c_str());
            return 1;
          }
          if (auto e = (*layer)->synchronize()) {
            std::printf("error: %s\n", m::describe(e).c_str());
            return 1;
          }
          const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
          gbs.push_back(static_cast<double>(tbytes[size_t(tab)]) / (ms * 1e-3) * 1e-9);
        }
        std::sort(gbs.begin(), gbs.end());
        if (gbs[gbs.size() / 2] > best_gbs) {
          best_gbs = gbs[gbs.size() / 2];
          best_bps = bps;
        }
      }
      if (!header) {
        std::printf("\n%-8s %6s %10s | %12s %10s %13s | %10s %12s %14s\n", "layer", "tokens", "weight GB", "read GB/s", "read ms",
                    "(blocks/SM)", "ours ms", "ours / read", "read / bytes/bw");
        header = true;
      }
      const double read_ms = ours.second / (best_gbs * 1e9) * 1e3, bound_ms = ours.second / (roof->copy_gbs * 1e9) * 1e3;
      char bpsl[32];
      if (best_bps == 0) std::snprintf(bpsl, sizeof bpsl, "(1 per 64 KiB)");
      else std::snprintf(bpsl, sizeof bpsl, "(%d)", best_bps);
      std::printf("%-8s %6lld %10.3f | %12.0f %10.3f %13s | %10.3f %11.2fx %13.2fx\n", s.name.c_str(), static_cast<long long>(t),
                  ours.second * 1e-9, best_gbs, read_ms, bpsl, ours.first, ours.first / read_ms, read_ms / bound_ms);
    }
  }
  std::printf("(median of %d after warm-up; median ms: host clock around each forward and its synchronisation, what the\n"
              " ratios use, over forwards without phase events; device ms: device events around the forward's work on its\n"
              " stream, over as many forwards with them (the events keep kernels from overlapping); targets:\n"
              " ratio <= 1.3 at 1-8 tokens, vs GEMM >= 70%% at 4096; exp: device events around the expert GEMMs alone,\n"
              " their FLOPs against the GEMM rate; pre/post: the device time before them (routing, the counts' trip to the\n"
              " host where it happens, dispatch, conversion) and after (combine), route: of pre, router GEMM, gating and\n"
              " counts; /host: the fused path's tile list made on the host after the counts' trip; /dev: made on the\n"
              " device; cN: the fused kernels' CTAs a cluster; HF = transformers' MoE block, same job;\n"
              " read: one kernel reading only the same experts' weights once, host clock, the best of four grid sizes,\n"
              " scaled to the forward's mean bytes)\n",
              reps);
  return 0;
}
