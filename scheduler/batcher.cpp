#include "scheduler/batcher.hpp"

#include <algorithm>
#include <cmath>

#include "metrics/metrics.hpp"
#include "model/error.hpp"

#include <caf/atom.hpp>
#include <caf/make_message.hpp>

#include <algorithm>

namespace sy::scheduler {

caf::error make_error(scheduler_errc code, std::string message) {
  return caf::error(static_cast<uint8_t>(code), caf::atom("scheduler"), caf::make_message(std::move(message)));
}

batcher::batcher(model::decoder& d, batcher_config cfg) : decoder_(d), cfg_(cfg) {}

batcher::~batcher() { stop(); }

caf::error batcher::submit(generation_request r) {
  if (r.prompt.empty()) return make_error(scheduler_errc::invalid_request, "prompt is empty");
  if (r.max_tokens < 0) return make_error(scheduler_errc::invalid_request, "max_tokens must be >= 0");
  if (auto e = model::validate(r.sampling)) return e;
  {
    std::lock_guard lock(mu_);
    if (stopped_ || draining_) return make_error(scheduler_errc::shutting_down, "the server is shutting down");
    if (static_cast<int>(queue_.size()) >= cfg_.max_queue)
      return make_error(scheduler_errc::queue_full, "the request queue is full (" + std::to_string(cfg_.max_queue) + ")");
    queue_.emplace_back(std::move(r), std::chrono::steady_clock::now());
  }
  cv_.notify_one();
  return {};
}

size_t batcher::queued() const {
  std::lock_guard lock(mu_);
  return queue_.size();
}

size_t batcher::running() const { return running_count_; }

void batcher::drain() {
  {
    std::lock_guard lock(mu_);
    draining_ = true;
  }
  cv_.notify_all();
}

bool batcher::idle() const {
  std::lock_guard lock(mu_);
  return queue_.empty() && running_count_ == 0;
}

void batcher::stop() {
  std::deque<std::pair<generation_request, std::chrono::steady_clock::time_point>> dropped;
  {
    std::lock_guard lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    dropped.swap(queue_);
  }
  cv_.notify_all();
  for (auto& [r, when] : dropped) {
    completion c;
    c.id = r.id;
    c.finish_reason = "error";
    c.error = make_error(scheduler_errc::shutting_down, "the server is shutting down");
    if (r.on_done) r.on_done(std::move(c));
  }
}

bool batcher::wait_for_work() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return stopped_ || !queue_.empty() || !running_.empty(); });
  return !stopped_;
}

void batcher::finish(sequence& s, std::string reason, caf::error err) {
  completion c;
  c.id = s.req.id;
  c.tokens = std::move(s.generated);
  c.finish_reason = std::move(reason);
  c.error = std::move(err);
  c.prompt_tokens = static_cast<int64_t>(s.req.prompt.size());
  auto ms = [&](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(t - s.submitted).count();
  };
  const auto now = std::chrono::steady_clock::now();
  c.queue_ms = ms(s.admitted);
  c.first_token_ms = s.first_token.time_since_epoch().count() ? ms(s.first_token) : 0;
  c.total_ms = ms(now);
  metrics::sequence_finished(c.finish_reason, c.prompt_tokens, static_cast<int64_t>(c.tokens.size()), c.first_token_ms / 1e3, c.total_ms / 1e3);
  c.token_logprobs = std::move(s.token_logprobs);
  c.top_logprobs = std::move(s.top_logprobs);
  if (s.req.on_done) s.req.on_done(std::move(c));
}

bool batcher::step() {
  // Admit queued requests at the step boundary.
  {
    std::lock_guard lock(mu_);
    while (!queue_.empty() && static_cast<int>(running_.size()) < cfg_.max_running) {
      auto seq = std::make_unique<sequence>(std::move(queue_.front().first));
      seq->submitted = queue_.front().second;
      seq->admitted = std::chrono::steady_clock::now();
      running_.push_back(std::move(seq));
      queue_.pop_front();
    }
    metrics::sequences(running_.size(), queue_.size());
  }
  // Sequences asking for no tokens finish without touching the model; cancelled ones (their
  // client went away) leave, freeing their cache.
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->req.cancel && (*it)->req.cancel->load()) {
      finish(**it, "cancelled");
      it = running_.erase(it);
    } else if ((*it)->req.max_tokens == 0) {
      finish(**it, "length");
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  running_count_ = running_.size();
  if (running_.empty()) return false;

  // Decode tokens first (one per decoding sequence), then prompt chunks within the budget.
  int budget = cfg_.step_token_budget;
  std::vector<model::sequence_step> steps;
  std::vector<sequence*> in_step;
  for (auto& s : running_)
    if (s->prefilled == s->req.prompt.size()) {
      steps.push_back({&s->cache, std::span<const int32_t>(&s->next, 1), false, &s->logits});
      in_step.push_back(s.get());
      --budget;
    }
  for (auto& s : running_) {
    if (s->prefilled == s->req.prompt.size() || budget <= 0) continue;
    const size_t n = std::min<size_t>(static_cast<size_t>(budget), s->req.prompt.size() - s->prefilled);
    steps.push_back({&s->cache, std::span<const int32_t>(s->req.prompt.data() + s->prefilled, n), false, &s->logits});
    in_step.push_back(s.get());
    budget -= static_cast<int>(n);
  }
  if (steps.empty()) return false;
  ++steps_;
  metrics::engine_step();
  if (auto err = decoder_.step(steps)) {
    // The step failed as a whole (e.g. no replica for an expert): fail its sequences with the reason.
    for (auto* s : in_step) finish(*s, "error", err);
    std::erase_if(running_, [&](const std::unique_ptr<sequence>& s) {
      return std::find(in_step.begin(), in_step.end(), s.get()) != in_step.end();
    });
    running_count_ = running_.size();
    return true;
  }
  const auto& eos = decoder_.config().eos_token_ids;
  std::vector<sequence*> stopped_by_callback;
  for (size_t i = 0; i < in_step.size(); ++i) {
    auto& s = *in_step[i];
    const bool was_prefill = s.prefilled < s.req.prompt.size();
    if (was_prefill) {
      s.prefilled += steps[i].tokens.size();
      if (s.prefilled < s.req.prompt.size()) continue;  // more prompt chunks to come
    }
    s.next = s.sampler.sample(s.logits);
    if (s.generated.empty()) s.first_token = std::chrono::steady_clock::now();
    s.generated.push_back(s.next);
    token_event ev{s.next, s.generated.size() - 1, 0.0f, nullptr};
    if (s.req.logprobs >= 0) {
      // log softmax of the raw logits
      const float mx = *std::max_element(s.logits.begin(), s.logits.end());
      double sum = 0;
      for (float v : s.logits) sum += std::exp(static_cast<double>(v - mx));
      const float lse = mx + static_cast<float>(std::log(sum));
      ev.logprob = s.logits[static_cast<size_t>(s.next)] - lse;
      std::vector<std::pair<int32_t, float>> top;
      const size_t k = std::min<size_t>(static_cast<size_t>(s.req.logprobs), s.logits.size());
      if (k > 0) {
        std::vector<int32_t> idx(s.logits.size());
        for (size_t j = 0; j < idx.size(); ++j) idx[j] = static_cast<int32_t>(j);
        std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), [&](int32_t a, int32_t b) {
          return s.logits[static_cast<size_t>(a)] > s.logits[static_cast<size_t>(b)] ||
                 (s.logits[static_cast<size_t>(a)] == s.logits[static_cast<size_t>(b)] && a < b);
        });
        for (size_t j = 0; j < k; ++j) top.emplace_back(idx[j], s.logits[static_cast<size_t>(idx[j])] - lse);
      }
      s.token_logprobs.push_back(ev.logprob);
      s.top_logprobs.push_back(std::move(top));
      ev.top = &s.top_logprobs.back();
    }
    if (s.req.on_token && !s.req.on_token(ev)) stopped_by_callback.push_back(&s);
  }
  for (auto it = running_.begin(); it != running_.end();) {
    auto& s = **it;
    bool done = false;
    if (!s.generated.empty() && s.prefilled == s.req.prompt.size()) {
      const int32_t last = s.generated.back();
      const bool stop_id = std::find(s.req.stop_token_ids.begin(), s.req.stop_token_ids.end(), last) != s.req.stop_token_ids.end();
      if ((s.req.stop_at_eos && std::find(eos.begin(), eos.end(), last) != eos.end()) || stop_id ||
          std::find(stopped_by_callback.begin(), stopped_by_callback.end(), &s) != stopped_by_callback.end()) {
        finish(s, "stop");
        done = true;
      } else if (static_cast<int>(s.generated.size()) >= s.req.max_tokens) {
        finish(s, "length");
        done = true;
      }
    }
    it = done ? running_.erase(it) : it + 1;
  }
  running_count_ = running_.size();
  return true;
}

}  // namespace sy::scheduler
