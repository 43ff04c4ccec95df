#pragma once
/// The decoder: embeddings → layers (attention with a KV cache, then a dense MLP or the MoE block)
/// → final norm → LM head, for a batch of sequences that each bring any number of new tokens.
/// Prefill and decode are the same call: a prompt is many new tokens, a decode step one.
#include "model/attention.hpp"
#include "model/moe.hpp"
#include "model/weights.hpp"

#include <memory>
#include <span>
#include <vector>

namespace sy::model {

/// One sequence's part of a step.
struct sequence_step {
  kv_cache* cache = nullptr;
  std::span<const int32_t> tokens;  ///< appended at position cache->length
  bool all_logits = false;          ///< logits for every new token (else for the last one only)
  std::vector<float>* logits = nullptr;  ///< out: [n or 1, vocab]
};

/// Observes the MoE block's input and output (tests compare them with the reference).
struct moe_probe {
  int layer = -1;
  std::vector<float> in, out;
};

class decoder {
 public:
  /// `experts` computes the routed experts (local or remote); `w` must hold the dense weights.
  decoder(const model_weights& w, expert_executor& experts);

  /// Runs all sequences' new tokens through the model, appending to their caches. On error no
  /// cache has advanced.
  [[nodiscard]] caf::error step(std::span<sequence_step> batch, moe_probe* probe = nullptr);

  [[nodiscard]] const model_config& config() const { return w_.config; }

  /// The MoE block of `layer` on rows x [T, hidden] (post-attention-norm input) into y [T, hidden].
  [[nodiscard]] caf::error moe_block(int layer, const float* x, int64_t t, float* y);

  /// Splits a step of two or more sequences into this many micro-batches (1 or 2) when the
  /// executor overlaps (`expert_executor::overlaps`): while one micro-batch's expert batches are
  /// away, the other's attention runs here (ping-pong), if the step has at least `min_rows` rows
  /// per half (small steps lose more to two rounds per layer than they gain). Results are the same
  /// as with 1.
  void set_micro_batches(int n, int64_t min_rows = 1) {
    micro_batches_ = n < 2 ? 1 : 2;
    micro_min_rows_ = min_rows < 1 ? 1 : min_rows;
  }
  [[nodiscard]] int micro_batches() const { return micro_batches_; }

  /// One MoE block in flight: gating done and expert batches sent; `moe_finish` combines.
  struct moe_flight {
    int layer = -1;
    dispatch_plan plan;
    std::vector<std::vector<float>> inputs, outputs;
    std::unique_ptr<expert_executor::ticket> ticket;
  };
  /// Gates x [T, hidden], sends the expert batches, and computes the shared expert into y while
  /// they are away.
  void moe_start(int layer, const float* x, int64_t t, float* y, moe_flight& f);
  /// Waits for the expert batches and adds their weighted outputs into y.
  [[nodiscard]] caf::error moe_finish(moe_flight& f, float* y);

 private:
  const model_weights& w_;
  expert_executor& experts_;
  attention attention_;
  int micro_batches_ = 1;
  int64_t micro_min_rows_ = 1;
};

}  // namespace sy::model
