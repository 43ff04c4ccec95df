#pragma once
/// The GPU expert path (CUDA + cuBLAS), optional at build time (SWITCHYARD_CUDA). This header has no
/// CUDA includes: CPU-only code can hold these types.
///
/// - `gpu_experts`: one device's experts in bf16; runs a step's token batches for all of them: up to
///   8 rows per expert as two GEMV kernels of our own (gate_up with SwiGLU fused, then down; every
///   expert in the same launch, weights streamed once), more rows as two grouped GEMM launches
///   (gate_up with SwiGLU on its accumulators, then down: our own Hopper kernels for many small
///   experts, cuBLAS with a SwiGLU kernel between otherwise); fp32 accumulation throughout.
/// - `gpu_moe_layer`: a whole MoE layer on the device for routers with a GPU: router GEMM (f32),
///   gating kernel (softmax or sigmoid + bias + group-limited top-k, as `route_from_logits`),
///   dispatch (count, scan, scatter), the experts, and the weighted combine. Up to 8 tokens the whole
///   layer runs without a host round trip (routing, work lists and the GEMV path stay on the
///   device), and so do steps that take our fused kernels whatever their counts (the tile list is
///   made on the device, `set_device_plan`); other steps bring the per-expert counts back once to
///   choose and size their GEMM launches.
/// - `gpu_expert_executor`: the decoder's `expert_executor` over `gpu_experts`, one per layer.
///
/// The CPU path is the oracle: with the same inputs, outputs agree within bf16 tolerance.
#include "model/gating.hpp"
#include "model/moe.hpp"

#include <memory>
#include <span>
#include <string>
#include <vector>

namespace sy::model::cuda {

/// True when a CUDA device is usable; otherwise `why` says what is missing (no driver, no device).
[[nodiscard]] bool device_available(std::string* why = nullptr);
/// "NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB"
[[nodiscard]] std::string device_description(int device = 0);

/// How an expert set's matrix products are launched:
/// - `grouped`: one grouped cuBLAS call per projection (`cublasGemmGroupedBatchedEx`);
/// - `per_expert`: one cuBLAS GEMM per expert;
/// - `padded`: one batched cuBLAS GEMM per projection over every active expert, each expert's rows
///   padded to the largest count (pays for the padding, gains cuBLAS's batched kernels);
/// - `gemv`: our GEMV kernels, all experts in one launch per projection (at most 8 rows per
///   expert; other batches fall back to `automatic`);
/// - `fused`: our grouped GEMM kernels (Hopper, `moe_gemm.hpp`): gate_up reads the token rows
///   directly and applies SwiGLU to its accumulators, down follows; no padding, two launches.
///   Where they cannot run (no sm_90 device, hidden not a multiple of 256 or ffn of 128) the
///   batch falls back to `automatic`;
/// - `automatic`: `gemv` up to 8 rows per expert (few large experts: above 2 rows per expert on
///   average not), then, where it can run, `fused`: in a whole layer (`gpu_moe_layer`, tile list
///   made on the device) for many small experts at any size and for few large ones up to a tile
///   (128 rows) an expert on average (Mixtral: 512 tokens); with counts on the host
///   (`gpu_experts`, or the layer with `set_device_plan(false)`) for many small experts averaging
///   at most 192 rows (more where padding is not cheap) and few large ones of at most
///   `padded_free_rows` rows (`expert_engine::use_fused`); then `padded` while padding is cheap
///   (every expert at most `padded_free_rows` rows, or padding adds at most half the rows, a
///   quarter for few large experts), else `grouped` for many small experts and `per_expert` for
///   few large ones (`expert_engine::use_padded`).
enum class gemm_mode { automatic, grouped, per_expert, padded, gemv, fused };
[[nodiscard]] const char* to_string(gemm_mode m);
/// Rows per expert up to which the GEMV path runs (a token picks an expert at most once, so a layer
/// step of up to this many tokens qualifies).
inline constexpr int gemv_max_rows = 8;
/// Rows per expert up to which `automatic` pads every expert to the largest count whatever the
/// padding: the GEMMs are bound by their weight reads there.
inline constexpr int padded_free_rows = 64;

/// The GEMV path's shape: weight rows each warp streams in the gate_up kernel (4 or 8: a gate row
/// and its up row per output column) and in the down kernel (2, 4 or 8; more rows per warp read
/// each input row fewer times), 0 = chosen by the step's rows per expert; whether each expert's
/// own row count picks the unrolling (`split`) rather than the step's largest; and whether the
/// kernels use programmatic dependent launch (each launches while the previous one drains; sm_90).
/// Defaults measured on an H200 (docs/benchmarks.md).
struct gemv_tuning {
  int gate_up_rows = 0;
  int down_rows = 0;
  bool pdl = true;
  bool split = true;
};

/// The fused kernels' shape: CTAs a cluster. 2: a pair of CTAs (two tiles of one expert) shares
/// each weight tile, each loading half and the copy engine writing it to both; 1: every CTA loads
/// its own; 0 (`automatic`'s choice): 2 where the device runs such clusters and the experts
/// average a full tile (128 rows) or more (counts known on the host: or at most a fifth of the
/// tiles would be empty; planned on the device: under balanced routing), else 1.
struct fused_tuning {
  int cluster = 0;
  /// A large step's kernels, from the gating to the combine, launched to start while the kernel
  /// before them drains (programmatic dependent launch, compute capability 9.0 on): each waits
  /// for that one before reading what it wrote; down loads its first weight stages during gate_up's
  /// last items.
  bool pdl = true;
};

class gpu_experts {
 public:
  static caf::expected<std::unique_ptr<gpu_experts>> make(int device, int64_t hidden, int64_t ffn);
  ~gpu_experts();
  gpu_experts(const gpu_experts&) = delete;
  gpu_experts& operator=(const gpu_experts&) = delete;

  /// Uploads expert `id`'s weights (any layout or dtype; stored as bf16 row-major on the device).
  [[nodiscard]] caf::error add_expert(int id, const expert_weights& w);
  /// Frees expert `id`'s device memory (no-op when not held).
  void remove_expert(int id);
  [[nodiscard]] bool holds(int id) const;
  [[nodiscard]] size_t device_bytes() const;

  /// outputs[i] = expert ids[i] applied to inputs[i] ([n[i], hidden] f32 rows, host memory).
  [[nodiscard]] caf::error run(std::span<const int> ids, std::span<const float* const> inputs,
                               std::span<const int64_t> n, std::span<float* const> outputs);
  void set_gemm_mode(gemm_mode m);
  void set_gemv_tuning(gemv_tuning t);
  void set_fused_tuning(fused_tuning t);
  /// CTAs a cluster of the last batch that ran `fused` (0 before any).
  [[nodiscard]] int last_fused_cluster() const;
  /// The launch kind the last batch ran with (never `automatic`).
  [[nodiscard]] gemm_mode last_gemm_mode() const;

  struct impl;

 private:
  explicit gpu_experts(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

class gpu_moe_layer {
 public:
  /// `experts[e]` null = expert e is not held here: rows routed to it are skipped (an expert host's
  /// share of a layer). `score_bias` may be null.
  static caf::expected<std::unique_ptr<gpu_moe_layer>> make(int device, const gating_config& gating,
                                                            const matrix& router, const float* score_bias,
                                                            std::span<const expert_weights* const> experts);
  ~gpu_moe_layer();
  gpu_moe_layer(const gpu_moe_layer&) = delete;
  gpu_moe_layer& operator=(const gpu_moe_layer&) = delete;

  /// y[t, H] = MoE(x[t, H]), host f32 in and out (uploads, computes, downloads, synchronises).
  [[nodiscard]] caf::error forward(const float* x, int64_t t, float* y);
  /// The same on device pointers (f32 [t, H] in and out), asynchronous on the layer's stream: up
  /// to `gemv_max_rows` tokens and on the device-planned fused path entirely; otherwise except for
  /// the one small copy of the per-expert counts the GEMM launches need (so the stream is idle when
  /// it starts). `synchronize` waits for the rest.
  [[nodiscard]] caf::error forward_device(const float* x_dev, int64_t t, float* y_dev);
  void set_gemm_mode(gemm_mode m);
  void set_gemv_tuning(gemv_tuning t);
  /// On (the default), a step that takes `fused` whatever its counts (`fused` asked for, or
  /// `automatic` for many small experts at any size and for few large ones up to a tile an expert
  /// on average) makes its tile list on the device and never waits for the host;
  /// off, every GEMM step brings its counts to the host first and `automatic` decides by them
  /// (tests and benchmarks compare the two).
  void set_device_plan(bool on);
  void set_fused_tuning(fused_tuning t);
  /// How steps above the GEMV path compute the router logits (set_router_gemm).
  enum class router_gemm {
    /// bf16 pieces where the router's weights are bf16 values (as bf16 checkpoints store them: three
    /// products) and the step runs our fused kernels with the tile list made on the device, from
    /// `router_pieces_from` tokens; f32 otherwise. Measured on an H100 (docs/benchmarks.md,
    /// 2026-12-07, third session), Qwen3-shaped with a bf16 router, pieces (through cuBLAS) against
    /// f32: 512 tokens 0.50 vs 0.51 ms, 2048 0.63 vs 0.65, 4096 0.88 vs 0.91, 8192 1.50 vs 1.54,
    /// 64 even (the one-pass kernel since: 0.48, 0.60, 0.86, 1.45; fifth session); with an
    /// f32 router (six products) pieces lose from 8192 tokens and below 2048. For Mixtral's few
    /// large experts on cuBLAS's kernels (its own conversion of the tokens) they gained nothing
    /// then; Mixtral steps that take the fused kernels (up to 512 tokens) use them.
    automatic,
    /// `cublasSgemm` on the f32 values (the default math mode, no TF32).
    f32,
    /// On the tensor cores in bf16 pieces: each f32 input split exactly into three bf16 values (hi,
    /// mid, lo), each router weight too (one piece for bf16 weights), the products f32 resolves (6
    /// of the 9; 3 for bf16 weights) summed in f32: the logits of an f32 GEMM up to rounding. x's
    /// hi piece is the bf16 copy of the tokens the fused kernels read. For bf16 weights (hidden a
    /// multiple of 64, at most 256 experts, compute capability 8.0 on, x 16-byte aligned) one
    /// kernel of ours reads x once, splits it on chip and accumulates the three products
    /// (mma.sync), H split into ranges by the batch's size; otherwise the pieces go through memory
    /// to cuBLAS's batched GEMMs. Either way the gating kernel sums the slices. The logits' last
    /// bits (and so a near-tie choice) may differ with the batch's size and the GPU, as with
    /// cuBLAS's own choice of kernels.
    bf16_pieces,
  };
  static constexpr int64_t router_pieces_from = 512;
  void set_router_gemm(router_gemm g);
  /// The last forward's router GEMM: 0 on the GEMV path (its own f32 kernel), 1 for `cublasSgemm`,
  /// else the number of bf16 products summed (3 or 6).
  [[nodiscard]] int last_router_parts() const;
  /// CTAs a cluster of the last batch that ran `fused` (0 before any).
  [[nodiscard]] int last_fused_cluster() const;
  /// The launch kind the last batch ran with (never `automatic`).
  [[nodiscard]] gemm_mode last_gemm_mode() const;
  /// Whether the last forward ran `fused` with its tile list made on the device.
  [[nodiscard]] bool last_device_planned() const;
  /// With timing on, each `forward_device` is bracketed by device events; `last_device_ms` waits
  /// for the last one and returns its time on the device (benchmarks: launch overhead excluded).
  void set_timing(bool on);
  [[nodiscard]] caf::expected<double> last_device_ms();
  /// With timing on, the last forward's device time in three parts (ms): routing, dispatch and
  /// conversions before the expert GEMMs (the host's read of the counts included, where it
  /// happens), the expert GEMMs (both products and what runs between them), the combine after;
  /// and, of `before`, the routing's share: router GEMM, gating and the per-expert counts. Not on
  /// the GEMV path.
  struct phases {
    double before = 0, experts = 0, after = 0, routing = 0;
  };
  [[nodiscard]] caf::expected<phases> last_phases();
  /// Waits for the layer's stream.
  [[nodiscard]] caf::error synchronize();

  /// The routing of the last forward (copied back for tests).
  [[nodiscard]] caf::expected<routing> last_routing();
  /// Local experts that received rows in the last forward, and their weight bytes (waits for the
  /// stream when the forward ran on the device-only path).
  [[nodiscard]] int last_active_experts() const;
  [[nodiscard]] size_t last_weight_bytes() const;

  /// The benchmarks' same-bytes baseline: `prepare_read_baseline(i)` (waits for the stream) records
  /// in table i (0-3) the weight matrices of the local experts the last forward used and returns
  /// their bytes; `read_baseline(i, b)` then launches, asynchronously on the layer's stream, one
  /// kernel that only reads those bytes once (b blocks of 256 threads per SM, 0 = one per 64 KiB):
  /// what any implementation spends at least on the same weights, timed the same way.
  [[nodiscard]] caf::expected<size_t> prepare_read_baseline(int table);
  [[nodiscard]] caf::error read_baseline(int table, int blocks_per_sm);

  /// Device scratch for benchmarks: f32 buffers of `elems` elements.
  [[nodiscard]] caf::expected<float*> device_alloc(size_t elems);
  [[nodiscard]] caf::error upload(float* dst, const float* src, size_t elems);

  struct impl;

 private:
  explicit gpu_moe_layer(std::unique_ptr<impl> p);
  [[nodiscard]] caf::error forward_launch(const float* x, int64_t t, float* y);
  [[nodiscard]] static caf::error combine(impl& s, int64_t t, float* y);
  std::unique_ptr<impl> impl_;
};

/// The decoder's expert executor over GPU-resident experts (one `gpu_experts` per sparse layer).
class gpu_expert_executor final : public expert_executor {
 public:
  /// Uploads every expert the model holds to `device`.
  static caf::expected<std::unique_ptr<gpu_expert_executor>> make(int device, const std::vector<layer_experts>& layers);
  [[nodiscard]] caf::error run(int layer, const dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                               std::vector<std::vector<float>>& outputs) override;

 private:
  std::vector<std::unique_ptr<gpu_experts>> layers_;
};

/// An expert host's experts on CUDA device `device` (`gpu_experts` per layer, created on the first
/// expert of that layer; calls serialised by a mutex).
[[nodiscard]] caf::expected<std::shared_ptr<device_experts>> make_device_experts(int device);

/// Device roofline measured in place: a large device-to-device copy (bytes read + written per
/// second) and a large cuBLAS bf16 GEMM (FLOP/s), each the median of several runs.
struct roofline {
  double copy_gbs = 0;
  double bf16_tflops = 0;
};
[[nodiscard]] caf::expected<roofline> measure_roofline(int device);

}  // namespace sy::model::cuda
