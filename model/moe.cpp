#include "model/moe.hpp"

#include "model/kernels.hpp"

#include <algorithm>
#include <cstring>
#include <string>

namespace sy::model {

void expert_weights::pack() {
  if (gate_up.type() == dtype::bf16 && !gate_up.packed()) gate_up = matrix::packed_from(gate_up);
  if (down.type() == dtype::bf16 && !down.packed()) down = matrix::packed_from(down);
}

dispatch_plan plan_dispatch(const routing& r, int num_experts) {
  std::vector<int32_t> counts(static_cast<size_t>(num_experts), 0);
  for (auto e : r.experts) ++counts[static_cast<size_t>(e)];
  std::vector<int32_t> slot(static_cast<size_t>(num_experts), -1);
  dispatch_plan p;
  p.tokens = r.tokens;
  for (int e = 0; e < num_experts; ++e) {
    if (!counts[static_cast<size_t>(e)]) continue;
    slot[static_cast<size_t>(e)] = static_cast<int32_t>(p.batches.size());
    auto& b = p.batches.emplace_back();
    b.expert = e;
    b.tokens.reserve(static_cast<size_t>(counts[static_cast<size_t>(e)]));
    b.weights.reserve(static_cast<size_t>(counts[static_cast<size_t>(e)]));
  }
  for (int64_t t = 0; t < r.tokens; ++t)
    for (int i = 0; i < r.top_k; ++i) {
      auto idx = static_cast<size_t>(t * r.top_k + i);
      auto& b = p.batches[static_cast<size_t>(slot[static_cast<size_t>(r.experts[idx])])];
      b.tokens.push_back(static_cast<int32_t>(t));
      b.weights.push_back(r.weights[idx]);
    }
  return p;
}

void gather_rows(const dispatch_plan& plan, const float* x, int64_t hidden, std::vector<std::vector<float>>& out) {
  out.resize(plan.batches.size());
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    const auto& b = plan.batches[i];
    out[i].resize(b.tokens.size() * static_cast<size_t>(hidden));
    for (size_t j = 0; j < b.tokens.size(); ++j)
      std::memcpy(out[i].data() + j * static_cast<size_t>(hidden), x + b.tokens[j] * hidden,
                  static_cast<size_t>(hidden) * 4);
  }
}

void expert_forward(const expert_weights& w, const float* x, int64_t n, float* y) {
  const int64_t f = w.ffn();
  thread_local std::vector<float> gu, h;
  gu.resize(static_cast<size_t>(n * 2 * f));
  h.resize(static_cast<size_t>(n * f));
  linear(x, n, w.gate_up, nullptr, gu.data());
  swiglu(gu.data(), n, f, h.data());
  linear(h.data(), n, w.down, nullptr, y);
}

void expert_forward_many(std::span<const expert_weights* const> experts, std::span<const float* const> inputs,
                         std::span<const int64_t> n, std::span<float* const> outputs) {
  const size_t m = experts.size();
  std::vector<std::vector<float>> gu(m), h(m);
  std::vector<linear_job> jobs(m);
  for (size_t i = 0; i < m; ++i) {
    gu[i].resize(static_cast<size_t>(n[i] * 2 * experts[i]->ffn()));
    jobs[i] = {inputs[i], n[i], &experts[i]->gate_up, gu[i].data()};
  }
  linear_grouped(jobs);
  for (size_t i = 0; i < m; ++i) {
    h[i].resize(static_cast<size_t>(n[i] * experts[i]->ffn()));
    swiglu(gu[i].data(), n[i], experts[i]->ffn(), h[i].data());
    jobs[i] = {h[i].data(), n[i], &experts[i]->down, outputs[i]};
  }
  linear_grouped(jobs);
}

void combine(const dispatch_plan& plan, const std::vector<std::vector<float>>& outputs, int64_t hidden, float* y) {
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    const auto& b = plan.batches[i];
    const float* o = outputs[i].data();
    for (size_t j = 0; j < b.tokens.size(); ++j) {
      float* yr = y + b.tokens[j] * hidden;
      const float* orow = o + j * static_cast<size_t>(hidden);
      const float wt = b.weights[j];
      for (int64_t c = 0; c < hidden; ++c) yr[c] += wt * orow[c];
    }
  }
}

namespace {
/// A ticket whose work already ran: it holds the result.
class done_ticket final : public expert_executor::ticket {
 public:
  explicit done_ticket(caf::error e) : result(std::move(e)) {}
  caf::error result;
};
}  // namespace

std::unique_ptr<expert_executor::ticket> expert_executor::start(int layer, const dispatch_plan& plan,
                                                                const std::vector<std::vector<float>>& inputs,
                                                                std::vector<std::vector<float>>& outputs) {
  return std::make_unique<done_ticket>(run(layer, plan, inputs, outputs));
}

caf::error expert_executor::finish(std::unique_ptr<ticket> t) {
  auto* d = dynamic_cast<done_ticket*>(t.get());
  if (!d) return make_error(model_errc::invalid_argument, "expert executor: a ticket from another executor");
  return std::move(d->result);
}

caf::error local_expert_executor::run(int layer, const dispatch_plan& plan,
                                      const std::vector<std::vector<float>>& inputs,
                                      std::vector<std::vector<float>>& outputs) {
  if (layer < 0 || static_cast<size_t>(layer) >= layers_->size())
    return make_error(model_errc::invalid_argument, "expert executor: no layer " + std::to_string(layer));
  const auto& experts = (*layers_)[static_cast<size_t>(layer)].experts;
  outputs.resize(plan.batches.size());
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    const auto e = static_cast<size_t>(plan.batches[i].expert);
    if (e >= experts.size() || !experts[e])
      return make_error(model_errc::invalid_argument, "expert executor: layer " + std::to_string(layer) +
                                                          " expert " + std::to_string(e) + " is not held here");
    outputs[i].resize(plan.batches[i].tokens.size() * static_cast<size_t>(experts[e]->hidden()));
  }
  // All of the step's experts as two grouped GEMM calls (gate_up, then down): many small experts
  // (Qwen3, DeepSeek) share the threads without a barrier per expert.
  std::vector<const expert_weights*> ws;
  std::vector<const float*> xs;
  std::vector<int64_t> ns;
  std::vector<float*> ys;
  for (size_t i = 0; i < plan.batches.size(); ++i) {
    ws.push_back(experts[static_cast<size_t>(plan.batches[i].expert)].get());
    xs.push_back(inputs[i].data());
    ns.push_back(static_cast<int64_t>(plan.batches[i].tokens.size()));
    ys.push_back(outputs[i].data());
  }
  expert_forward_many(ws, xs, ns, ys);
  return {};
}

}  // namespace sy::model
