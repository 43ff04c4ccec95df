#include "model/decoder.hpp"

#include "model/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

namespace sy::model {

namespace {

void add_into(float* x, const float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

decoder::decoder(const model_weights& w, expert_executor& experts) : w_(w), experts_(experts), attention_(w.config) {}

caf::error decoder::step(std::span<sequence_step> batch, moe_probe* probe) {
  const auto& c = w_.config;
  const int64_t h = c.hidden_size;
  if (w_.embed.empty()) return make_error(model_errc::invalid_argument, "decoder: the dense weights are not loaded");
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (auto& s : batch) {
    if (!s.cache) return make_error(model_errc::invalid_argument, "decoder: sequence without a cache");
    for (auto tok : s.tokens)
      if (tok < 0 || tok >= c.vocab_size)
        return make_error(model_errc::invalid_argument, "token id " + std::to_string(tok) + " is outside the vocabulary [0, " +
                                                            std::to_string(c.vocab_size) + ")");
    offsets.push_back(total);
    total += static_cast<int64_t>(s.tokens.size());
    if (s.cache->a.size() != static_cast<size_t>(c.num_layers)) {
      s.cache->a.resize(static_cast<size_t>(c.num_layers));
      s.cache->b.resize(static_cast<size_t>(c.num_layers));
    }
  }
  offsets.push_back(total);
  if (total == 0) return {};
  experts_.begin_step();
  struct step_guard {
    expert_executor& e;
    ~step_guard() { e.end_step(); }
  } guard{experts_};
  std::vector<attention_seq> seqs;
  for (size_t i = 0; i < batch.size(); ++i) seqs.push_back({batch[i].cache, offsets[i], offsets[i + 1]});

  std::vector<float> x(static_cast<size_t>(total * h)), hbuf(x.size()), ybuf(x.size());
  for (size_t i = 0, row = 0; i < batch.size(); ++i)
    for (auto tok : batch[i].tokens) w_.embed.row_f32(tok, x.data() + (row++) * h);

  auto rollback = [&] {
    for (auto& s : batch)
      for (int l = 0; l < c.num_layers; ++l) {
        s.cache->a[static_cast<size_t>(l)].resize(static_cast<size_t>(s.cache->length * cache_width_a(c)));
        s.cache->b[static_cast<size_t>(l)].resize(static_cast<size_t>(s.cache->length * cache_width_b(c)));
      }
  };

  for (int l = 0; l < c.num_layers; ++l) {
    const auto& L = w_.layers[static_cast<size_t>(l)];
    rmsnorm(x.data(), L.input_norm.data(), total, h, c.rms_norm_eps, hbuf.data());
    attention_.forward(l, L.attn, hbuf.data(), seqs, ybuf.data());
    add_into(x.data(), ybuf.data(), x.size());
    rmsnorm(x.data(), L.post_norm.data(), total, h, c.rms_norm_eps, hbuf.data());
    if (c.moe_layer[static_cast<size_t>(l)]) {
      if (auto e = moe_block(l, hbuf.data(), total, ybuf.data())) {
        rollback();
        return e;
      }
      if (probe && probe->layer == l) {
        probe->in = hbuf;
        probe->out = ybuf;
      }
    } else {
      expert_forward(*L.dense_mlp, hbuf.data(), total, ybuf.data());
    }
    add_into(x.data(), ybuf.data(), x.size());
  }
  for (size_t i = 0; i < batch.size(); ++i) batch[i].cache->length += static_cast<int64_t>(batch[i].tokens.size());

  // Final norm and LM head only on the rows whose logits are wanted.
  const auto& head = w_.output_matrix();
  for (size_t i = 0; i < batch.size(); ++i) {
    auto& s = batch[i];
    if (!s.logits || s.tokens.empty()) continue;
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t first = s.all_logits ? offsets[i] : offsets[i] + n - 1;
    const int64_t rows = s.all_logits ? n : 1;
    std::vector<float> normed(static_cast<size_t>(rows * h));
    rmsnorm(x.data() + first * h, w_.final_norm.data(), rows, h, c.rms_norm_eps, normed.data());
    s.logits->resize(static_cast<size_t>(rows * c.vocab_size));
    linear(normed.data(), rows, head, nullptr, s.logits->data());
  }
  return {};
}

caf::error decoder::moe_block(int layer, const float* x, int64_t t, float* y) {
  const auto& c = w_.config;
  const auto& M = w_.layers[static_cast<size_t>(layer)].moe;
  const int64_t h = c.hidden_size;
  routing r = gate(c.gating, M.router, M.score_bias.empty() ? nullptr : M.score_bias.data(), x, t);
  dispatch_plan plan = plan_dispatch(r, c.gating.num_experts);
  std::vector<std::vector<float>> inputs, outputs;
  gather_rows(plan, x, h, inputs);
  if (auto e = experts_.run(layer, plan, inputs, outputs)) return e;
  std::fill(y, y + t * h, 0.0f);
  if (M.shared) {
    expert_forward(*M.shared, x, t, y);
    if (!M.shared_gate.empty()) {
      std::vector<float> g(static_cast<size_t>(t));
      linear(x, t, M.shared_gate, nullptr, g.data());
      for (int64_t i = 0; i < t; ++i) {
        const float s = sigmoid(g[static_cast<size_t>(i)]);
        for (int64_t j = 0; j < h; ++j) y[i * h + j] *= s;
      }
    }
  }
  combine(plan, outputs, h, y);
  return {};
}

}  // namespace sy::model
