#pragma once
/// The MoE block as four functions with plain data between them:
///   gate (gating.hpp) → plan_dispatch → expert_forward (per expert: rows in, rows out) → combine.
/// The cluster puts a network between dispatch and combine, so `expert_forward` depends on nothing
/// but its weights and its input rows.
#include "model/error.hpp"
#include "model/gating.hpp"
#include "model/tensor.hpp"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace sy::model {

/// One expert's FFN, SwiGLU: down(silu(x·gateᵀ) ⊙ x·upᵀ). gate and up are stored as one [2F, H]
/// matrix so one pass over the weights yields both.
struct expert_weights {
  matrix gate_up;  ///< [2F, H]: rows [0, F) gate, [F, 2F) up
  matrix down;     ///< [H, F]
  [[nodiscard]] int64_t hidden() const { return down.rows(); }
  [[nodiscard]] int64_t ffn() const { return down.cols(); }
  [[nodiscard]] size_t bytes() const { return gate_up.bytes() + down.bytes(); }
  /// Re-lays bf16 weights out in the packed GEMM layout (no-op for f32 or packed weights).
  void pack();
};

/// The token rows one expert receives in one step, in ascending token order.
struct expert_batch {
  int32_t expert = 0;
  std::vector<int32_t> tokens;  ///< row index into the step's [T, hidden] input
  std::vector<float> weights;   ///< the gate weight of each row for this expert
};

/// Per expert that received at least one token, which rows; experts ascending.
struct dispatch_plan {
  int64_t tokens = 0;
  std::vector<expert_batch> batches;
};

[[nodiscard]] dispatch_plan plan_dispatch(const routing& r, int num_experts);

/// Copies the rows of `x` ([T, hidden]) each batch needs into `out[i]` ([n_i, hidden]).
void gather_rows(const dispatch_plan& plan, const float* x, int64_t hidden, std::vector<std::vector<float>>& out);

/// y[n, H] = expert(x[n, H]). Pure: reads only its arguments.
void expert_forward(const expert_weights& w, const float* x, int64_t n, float* y);

/// Several experts at once, each on its own rows: outputs[i] = experts[i](inputs[i]) with n[i] rows.
/// Same results as `expert_forward` on each; the GEMMs of all experts run as two grouped calls.
void expert_forward_many(std::span<const expert_weights* const> experts, std::span<const float* const> inputs,
                         std::span<const int64_t> n, std::span<float* const> outputs);

/// y[t] += Σ over batches of weight · output row, for the rows each batch holds. Expert order is
/// ascending, as the reference implementations accumulate.
void combine(const dispatch_plan& plan, const std::vector<std::vector<float>>& outputs, int64_t hidden, float* y);

/// Runs the experts of one layer's dispatch plan: inputs[i] holds batch i's rows [n_i, hidden],
/// outputs[i] receives the expert's rows of the same shape. The local executor computes them in
/// this process; the cluster's sends them to expert hosts.
class expert_executor {
 public:
  virtual ~expert_executor() = default;
  /// Called by the decoder before a step's first layer: a distributed executor pins one placement
  /// epoch for the whole step here.
  virtual void begin_step() {}
  /// Called by the decoder when that step is over (also when it failed).
  virtual void end_step() {}
  [[nodiscard]] virtual caf::error run(int layer, const dispatch_plan& plan,
                                       const std::vector<std::vector<float>>& inputs,
                                       std::vector<std::vector<float>>& outputs) = 0;

  /// `run` in two halves, so the caller can compute while the experts do: `start` sends the work
  /// and returns, `finish` waits for it and fills `outputs`. `plan`, `inputs` and `outputs` must
  /// stay alive and untouched until `finish` returns; every started ticket must be finished (also
  /// after an error elsewhere). The default runs `run` in `start`.
  class ticket {
   public:
    virtual ~ticket() = default;
  };
  [[nodiscard]] virtual std::unique_ptr<ticket> start(int layer, const dispatch_plan& plan,
                                                      const std::vector<std::vector<float>>& inputs,
                                                      std::vector<std::vector<float>>& outputs);
  [[nodiscard]] virtual caf::error finish(std::unique_ptr<ticket> t);
  /// True where `start` returns before the experts are done (a network between them), so work
  /// between `start` and `finish` overlaps theirs.
  [[nodiscard]] virtual bool overlaps() const { return false; }
};

/// Experts an expert host keeps on a device (a GPU): weights uploaded once, token batches computed
/// there. Implementations are safe to call from several threads.
class device_experts {
 public:
  virtual ~device_experts() = default;
  /// Uploads (layer, expert)'s weights; replaces what that pair held.
  [[nodiscard]] virtual caf::error add(int layer, int expert, const expert_weights& w) = 0;
  /// Frees the pair's device memory (after any batch using it).
  virtual void remove(int layer, int expert) = 0;
  /// outputs[i] = experts[i] of `layer` on inputs[i] ([rows[i], hidden] f32 rows, host memory).
  [[nodiscard]] virtual caf::error run(int layer, std::span<const int> experts, std::span<const float* const> inputs,
                                       std::span<const int64_t> rows, std::span<float* const> outputs) = 0;
  /// "cuda:0 (NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB)"
  [[nodiscard]] virtual std::string describe() const = 0;
};

/// Experts of one layer held in memory; null entries are experts this process does not hold.
struct layer_experts {
  std::vector<std::unique_ptr<expert_weights>> experts;
};

/// Executes on experts held in this process.
class local_expert_executor final : public expert_executor {
 public:
  explicit local_expert_executor(const std::vector<layer_experts>* layers) : layers_(layers) {}
  [[nodiscard]] caf::error run(int layer, const dispatch_plan& plan, const std::vector<std::vector<float>>& inputs,
                               std::vector<std::vector<float>>& outputs) override;

 private:
  const std::vector<layer_experts>* layers_;
};

}  // namespace sy::model
