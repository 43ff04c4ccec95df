#pragma once
/// A cluster simulator for rebalancing at sizes this machine cannot run: it replays a load trace
/// (tokens per layer and expert, window by window) over a modelled cluster and measures what a
/// placement policy gives — throughput per GPU and replica moves — with the real planner.
///
/// Model, per MoE layer and step: each expert's tokens are split over its replicas by their
/// traffic shares; a replica's time is a roofline, max(weight bytes / memory bandwidth, FLOPs /
/// peak FLOP/s); a GPU's time is the sum over its replicas; the layer takes as long as its slowest
/// GPU plus the all-to-all (each token's hidden state out and back, over the per-GPU link). A
/// step is the sum over layers (the dense part is the same for every policy and left out). A
/// replica moved costs its weight bytes over the link of the GPU receiving it.
#include "scheduler/planner.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace sy::scheduler {

struct sim_cluster {
  int gpus = 32;
  int nodes = 4;
  int slots = 288;                ///< replicas per layer over all GPUs
  double hbm_bytes_per_s = 3.35e12;
  double flops = 989e12;          ///< dense bf16 peak
  double link_bytes_per_s = 50e9; ///< per GPU (e.g. 400 Gb/s)
};

struct sim_model {
  int layers = 58;
  int experts = 256;
  int groups = 8;
  int top_k = 8;
  int64_t hidden = 7168;
  int64_t ffn = 2048;             ///< expert FFN width
  double weight_bytes = 1;        ///< per weight (1 = FP8, 2 = bf16)
  int64_t tokens_per_step = 0;    ///< 0 = 64 per GPU (decode batch)
};

enum class sim_policy { static_initial, eplb, planner };

struct sim_options {
  sim_policy policy = sim_policy::planner;
  int rebalance_every = 1;        ///< windows between re-plans (not for static_initial)
  int64_t max_moves = -1;         ///< planner: per re-plan (-1 = none)
  double smoothing = 0.5;         ///< weight of the newest window in the load estimate
  double window_seconds = 60;     ///< traffic time one window stands for (moves per hour)
};

struct sim_result {
  double tokens_per_s_per_gpu = 0;  ///< mean over windows
  double balancedness = 0;          ///< mean over windows, of the actual (not estimated) load
  int64_t moves = 0;
  double moves_per_hour = 0;
  double move_seconds = 0;          ///< link time spent moving weights, summed over GPUs
};

/// Replays `trace` ([window][layer][expert] tokens) under `opt`. The plan for window w is made
/// from the load seen up to window w - 1 (the first window starts from EPLB-style uniform counts).
[[nodiscard]] caf::expected<sim_result> simulate(const sim_cluster& c, const sim_model& m,
                                                 const std::vector<std::vector<std::vector<double>>>& trace,
                                                 const sim_options& opt);

/// A drifting trace: Zipf popularity per layer (exponent `zipf`), each window every load × a
/// random factor in [1 - drift, 1 + drift] and, with probability `swap`, two experts of a layer
/// trade places (the hot set moves).
[[nodiscard]] std::vector<std::vector<std::vector<double>>> drifting_trace(int windows, int layers, int experts, double zipf,
                                                                           double drift, double swap, uint64_t seed);

}  // namespace sy::scheduler
