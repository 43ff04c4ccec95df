#include "model/decoder.hpp"

#include "model/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
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
  if (probe) {
    probe->in.clear();
    probe->out.clear();
  }

  // Micro-batches: contiguous runs of sequences, each with its own activations. With two, the
  // second one's attention runs while the first one's expert batches are away, and the other way
  // round (ping-pong); a step never mixes epochs, since both run inside this one step.
  struct micro {
    size_t first = 0, last = 0;  ///< sequences [first, last) of the batch
    int64_t row0 = 0, rows = 0;  ///< their rows [row0, row0 + rows) of the step
    std::vector<attention_seq> seqs;
    std::vector<float> x, h, y;
    moe_flight moe;
    bool in_flight = false;
  };
  size_t split = batch.size();
  if (micro_batches_ > 1 && batch.size() >= 2 && total >= 2 * micro_min_rows_ && experts_.overlaps()) {
    // Balance the rows: the cut whose prefix is closest to half of them.
    split = 1;
    for (size_t k = 2; k < batch.size(); ++k)
      if (std::llabs(2 * offsets[k] - total) < std::llabs(2 * offsets[split] - total)) split = k;
    // Both halves need min_rows rows: a 64-token prefill beside a few decode rows would otherwise
    // be cut into 64 and 7, two rounds of messages per layer with little attention to overlap.
    if (offsets[split] < micro_min_rows_ || total - offsets[split] < micro_min_rows_) split = batch.size();
  }
  std::vector<micro> mbs(split == batch.size() ? 1 : 2);
  mbs[0].first = 0;
  mbs[0].last = split;
  if (mbs.size() == 2) {
    mbs[1].first = split;
    mbs[1].last = batch.size();
  }
  for (auto& m : mbs) {
    m.row0 = offsets[m.first];
    m.rows = offsets[m.last] - m.row0;
    for (size_t i = m.first; i < m.last; ++i) m.seqs.push_back({batch[i].cache, offsets[i] - m.row0, offsets[i + 1] - m.row0});
    m.x.resize(static_cast<size_t>(m.rows * h));
    m.h.resize(m.x.size());
    m.y.resize(m.x.size());
    int64_t row = 0;
    for (size_t i = m.first; i < m.last; ++i)
      for (auto tok : batch[i].tokens) w_.embed.row_f32(tok, m.x.data() + (row++) * h);
  }

  auto rollback = [&] {
    for (auto& s : batch)
      for (int l = 0; l < c.num_layers; ++l) {
        s.cache->a[static_cast<size_t>(l)].resize(static_cast<size_t>(s.cache->length * cache_width_a(c)));
        s.cache->b[static_cast<size_t>(l)].resize(static_cast<size_t>(s.cache->length * cache_width_b(c)));
      }
  };
  // Ends a micro-batch's MoE block in flight: combine, then the residual.
  auto land = [&](micro& m) -> caf::error {
    if (!m.in_flight) return {};
    m.in_flight = false;
    if (auto e = moe_finish(m.moe, m.y.data())) return e;
    if (probe && probe->layer == m.moe.layer) {
      probe->in.insert(probe->in.end(), m.h.begin(), m.h.end());
      probe->out.insert(probe->out.end(), m.y.begin(), m.y.end());
    }
    add_into(m.x.data(), m.y.data(), m.x.size());
    return {};
  };
  // On an error every ticket still in flight is finished (its buffers are ours) before returning.
  auto fail = [&](caf::error e) {
    for (auto& m : mbs)
      if (m.in_flight) {
        m.in_flight = false;
        (void)moe_finish(m.moe, m.y.data());
      }
    rollback();
    return e;
  };

  for (int l = 0; l < c.num_layers; ++l) {
    const auto& L = w_.layers[static_cast<size_t>(l)];
    for (auto& m : mbs) {
      if (auto e = land(m)) return fail(std::move(e));
      rmsnorm(m.x.data(), L.input_norm.data(), m.rows, h, c.rms_norm_eps, m.h.data());
      attention_.forward(l, L.attn, m.h.data(), m.seqs, m.y.data());
      add_into(m.x.data(), m.y.data(), m.x.size());
      rmsnorm(m.x.data(), L.post_norm.data(), m.rows, h, c.rms_norm_eps, m.h.data());
      if (c.moe_layer[static_cast<size_t>(l)]) {
        moe_start(l, m.h.data(), m.rows, m.y.data(), m.moe);
        m.in_flight = true;
      } else {
        expert_forward(*L.dense_mlp, m.h.data(), m.rows, m.y.data());
        add_into(m.x.data(), m.y.data(), m.x.size());
      }
    }
  }
  for (auto& m : mbs)
    if (auto e = land(m)) return fail(std::move(e));
  for (size_t i = 0; i < batch.size(); ++i) batch[i].cache->length += static_cast<int64_t>(batch[i].tokens.size());

  // Final norm and LM head only on the rows whose logits are wanted.
  const auto& head = w_.output_matrix();
  for (const auto& m : mbs)
    for (size_t i = m.first; i < m.last; ++i) {
      auto& s = batch[i];
      if (!s.logits || s.tokens.empty()) continue;
      const int64_t n = static_cast<int64_t>(s.tokens.size());
      const int64_t first = (s.all_logits ? offsets[i] : offsets[i] + n - 1) - m.row0;
      const int64_t rows = s.all_logits ? n : 1;
      std::vector<float> normed(static_cast<size_t>(rows * h));
      rmsnorm(m.x.data() + first * h, w_.final_norm.data(), rows, h, c.rms_norm_eps, normed.data());
      s.logits->resize(static_cast<size_t>(rows * c.vocab_size));
      linear(normed.data(), rows, head, nullptr, s.logits->data());
    }
  return {};
}

caf::error decoder::moe_block(int layer, const float* x, int64_t t, float* y) {
  moe_flight f;
  moe_start(layer, x, t, y, f);
  return moe_finish(f, y);
}

void decoder::moe_start(int layer, const float* x, int64_t t, float* y, moe_flight& f) {
  const auto& c = w_.config;
  const auto& M = w_.layers[static_cast<size_t>(layer)].moe;
  const int64_t h = c.hidden_size;
  routing r = gate(c.gating, M.router, M.score_bias.empty() ? nullptr : M.score_bias.data(), x, t);
  f.layer = layer;
  f.plan = plan_dispatch(r, c.gating.num_experts);
  gather_rows(f.plan, x, h, f.inputs);
  f.ticket = experts_.start(layer, f.plan, f.inputs, f.outputs);
  // The shared expert runs here while the routed experts' batches are away.
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
}

caf::error decoder::moe_finish(moe_flight& f, float* y) {
  if (auto e = experts_.finish(std::move(f.ticket))) return e;
  combine(f.plan, f.outputs, w_.config.hidden_size, y);
  return {};
}

}  // namespace sy::model
