#pragma once
/// Continuous batching: every step advances all running sequences together; new requests join at
/// step boundaries, their prompts prefilled in chunks under a per-step token budget; finished
/// sequences leave at once. One thread drives `step()` (the engine loop); `submit` may be called
/// from any thread.
#include "model/decoder.hpp"
#include "model/sampler.hpp"

#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace sy::scheduler {

/// A finished (or failed) generation.
struct completion {
  uint64_t id = 0;
  std::vector<int32_t> tokens;  ///< generated tokens only
  std::string finish_reason;    ///< "stop" (EOS), "length" (max_tokens), "error"
  caf::error error;             ///< set when finish_reason is "error"
  int64_t prompt_tokens = 0;
  double queue_ms = 0;           ///< submit → admitted to the running batch
  double first_token_ms = 0;     ///< submit → first token sampled (time to first token)
  double total_ms = 0;           ///< submit → finished
  /// With `logprobs` ≥ 0 in the request: per generated token, its log-probability under the
  /// model (before temperature and truncation) and the `logprobs` most likely tokens with theirs.
  std::vector<float> token_logprobs;
  std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;
};

/// One sampled token, as `on_token` sees it.
struct token_event {
  int32_t token = 0;
  size_t index = 0;                                      ///< 0 for the first generated token
  float logprob = 0;                                     ///< when logprobs were asked for
  const std::vector<std::pair<int32_t, float>>* top = nullptr;
};

struct generation_request {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  int max_tokens = 16;
  model::sampling_params sampling;
  bool stop_at_eos = true;
  std::vector<int32_t> stop_token_ids;  ///< also finish ("stop") at these
  int logprobs = -1;                    ///< ≥ 0: report log-probabilities with this many alternatives
  /// Called from the engine thread after each generated token (streaming, stop strings); returning
  /// false finishes the sequence now with "stop".
  std::function<bool(const token_event&)> on_token;
  /// Set from any thread (a client that went away): the sequence leaves at the next step, its KV
  /// cache and slot freed, and finishes with "cancelled".
  std::shared_ptr<std::atomic<bool>> cancel;
  /// Called once, from the engine thread, when the sequence finishes or fails.
  std::function<void(completion)> on_done;
};

struct batcher_config {
  int max_running = 64;            ///< sequences decoding at once
  int max_queue = 256;             ///< admitted but not yet running; beyond it `submit` refuses
  int step_token_budget = 512;     ///< tokens per step (decode tokens + prefill chunks)
};

enum class scheduler_errc : uint8_t { none = 0, queue_full, shutting_down, invalid_request };
[[nodiscard]] caf::error make_error(scheduler_errc code, std::string message);

class batcher {
 public:
  batcher(model::decoder& d, batcher_config cfg);
  ~batcher();

  /// Queues a request; refuses at once (queue_full) beyond `max_queue`, never waits.
  [[nodiscard]] caf::error submit(generation_request r);

  /// Runs one engine step if there is work; returns false when idle.
  bool step();
  /// Blocks until there is work or `stop()` was called; returns false once stopped.
  bool wait_for_work();
  /// Fails queued and running requests with `shutting_down` and wakes the engine thread.
  void stop();
  /// Graceful shutdown, first half: refuses new requests (`shutting_down`) and lets the queued and
  /// running ones finish; `idle()` says when they have.
  void drain();
  [[nodiscard]] bool idle() const;

  [[nodiscard]] size_t queued() const;
  [[nodiscard]] size_t running() const;
  [[nodiscard]] uint64_t steps() const { return steps_; }

 private:
  struct sequence {
    generation_request req;
    std::chrono::steady_clock::time_point submitted, admitted, first_token;
    model::kv_cache cache;
    model::sampler sampler;
    size_t prefilled = 0;  ///< prompt tokens already in the cache
    std::vector<int32_t> generated;
    std::vector<float> logits;
    std::vector<float> token_logprobs;
    std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;
    int32_t next = -1;  ///< token to feed this step (decode)
    explicit sequence(generation_request r) : req(std::move(r)), sampler(req.sampling) {}
  };
  void finish(sequence& s, std::string reason, caf::error err = {});

  model::decoder& decoder_;
  batcher_config cfg_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<generation_request, std::chrono::steady_clock::time_point>> queue_;
  bool stopped_ = false;
  bool draining_ = false;
  std::atomic<size_t> running_count_{0};
  std::vector<std::unique_ptr<sequence>> running_;  ///< engine thread only
  uint64_t steps_ = 0;
};

}  // namespace sy::scheduler
