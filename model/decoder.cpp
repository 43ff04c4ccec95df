#include "model/decoder.hpp"

#include "model/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

namespace sy::model {

namespace {

int64_t cache_width_a(const model_config& c) {
  return c.attention == attention_kind::mla ? c.kv_lora_rank : c.num_kv_heads * c.head_dim;
}
int64_t cache_width_b(const model_config& c) {
  return c.attention == attention_kind::mla ? c.qk_rope_head_dim : c.num_kv_heads * c.head_dim;
}

void add_into(float* x, const float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

size_t kv_cache::bytes() const {
  size_t n = 0;
  for (auto& v : a) n += v.size() * 4;
  for (auto& v : b) n += v.size() * 4;
  return n;
}

cache_footprint cache_bytes_per_token(const model_config& c) {
  cache_footprint f;
  f.stored = (cache_width_a(c) + cache_width_b(c)) * 4;
  f.expanded = c.attention == attention_kind::mla
                   ? static_cast<int64_t>(c.num_heads) * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 4
                   : f.stored;
  return f;
}

decoder::decoder(const model_weights& w, expert_executor& experts) : w_(w), experts_(experts) {
  const auto& c = w.config;
  rope_ = rope_table(c.rope, c.attention == attention_kind::mla ? c.qk_rope_head_dim : c.head_dim);
  softmax_scale_ = 1.0 / std::sqrt(static_cast<double>(c.q_head_dim()));
  if (c.attention == attention_kind::mla && c.rope.type == "yarn" && c.rope.mscale_all_dim != 0) {
    const double m = c.rope.factor <= 1 ? 1.0 : 0.1 * c.rope.mscale_all_dim * std::log(c.rope.factor) + 1.0;
    softmax_scale_ *= m * m;
  }
}

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
    if (auto e = attention(l, hbuf.data(), batch, offsets, ybuf.data())) {
      rollback();
      return e;
    }
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

caf::error decoder::attention(int layer, const float* x, std::span<sequence_step> batch,
                              const std::vector<int64_t>& offsets, float* out) {
  if (w_.config.attention == attention_kind::mla)
    attention_mla(layer, x, batch, offsets, out);
  else
    attention_gqa(layer, x, batch, offsets, out);
  return {};
}

void decoder::attention_gqa(int layer, const float* x, std::span<sequence_step> batch,
                            const std::vector<int64_t>& offsets, float* out) {
  const auto& c = w_.config;
  const auto& A = w_.layers[static_cast<size_t>(layer)].attn;
  const int64_t t = offsets.back();
  const int nh = c.num_heads, nkv = c.num_kv_heads;
  const int64_t hd = c.head_dim, qd = nh * hd, kd = nkv * hd;
  std::vector<float> q(static_cast<size_t>(t * qd)), k(static_cast<size_t>(t * kd)), v(static_cast<size_t>(t * kd));
  linear(x, t, A.q, A.q_bias.empty() ? nullptr : A.q_bias.data(), q.data());
  linear(x, t, A.k, A.k_bias.empty() ? nullptr : A.k_bias.data(), k.data());
  linear(x, t, A.v, A.v_bias.empty() ? nullptr : A.v_bias.data(), v.data());
  if (c.qk_norm == qk_norm_kind::whole) {
    rmsnorm(q.data(), A.q_norm.data(), t, qd, c.rms_norm_eps, q.data());
    rmsnorm(k.data(), A.k_norm.data(), t, kd, c.rms_norm_eps, k.data());
  } else if (c.qk_norm == qk_norm_kind::per_head) {
    rmsnorm(q.data(), A.q_norm.data(), t * nh, hd, c.rms_norm_eps, q.data());
    rmsnorm(k.data(), A.k_norm.data(), t * nkv, hd, c.rms_norm_eps, k.data());
  }
  if (c.clip_qkv) {
    const float lim = static_cast<float>(*c.clip_qkv);
    for (auto* vec : {&q, &k, &v})
      for (auto& e : *vec) e = std::clamp(e, -lim, lim);
  }
  const int64_t window = c.sliding_window[static_cast<size_t>(layer)];
  const int group = nh / nkv;
  std::vector<float> attn(static_cast<size_t>(t * qd));
  for (size_t i = 0; i < batch.size(); ++i) {
    auto& cache = *batch[i].cache;
    const int64_t base = cache.length, n = offsets[i + 1] - offsets[i];
    auto& K = cache.a[static_cast<size_t>(layer)];
    auto& V = cache.b[static_cast<size_t>(layer)];
    for (int64_t j = 0; j < n; ++j) rope_.apply(q.data() + (offsets[i] + j) * qd, nh, hd, base + j);
    for (int64_t j = 0; j < n; ++j) rope_.apply(k.data() + (offsets[i] + j) * kd, nkv, hd, base + j);
    K.insert(K.end(), k.begin() + offsets[i] * kd, k.begin() + (offsets[i] + n) * kd);
    V.insert(V.end(), v.begin() + offsets[i] * kd, v.begin() + (offsets[i] + n) * kd);
    std::vector<float> scores(static_cast<size_t>(base + n));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = base + j;
      const int64_t from = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t len = pos + 1 - from;
      for (int hh = 0; hh < nh; ++hh) {
        const float* qv = q.data() + (offsets[i] + j) * qd + hh * hd;
        const int64_t kvh = hh / group;
        for (int64_t p = 0; p < len; ++p) {
          const float* kv = K.data() + (from + p) * kd + kvh * hd;
          float s = 0;
          for (int64_t d = 0; d < hd; ++d) s += qv[d] * kv[d];
          scores[static_cast<size_t>(p)] = static_cast<float>(s * softmax_scale_);
        }
        softmax(scores.data(), len);
        float* o = attn.data() + (offsets[i] + j) * qd + hh * hd;
        std::fill(o, o + hd, 0.0f);
        for (int64_t p = 0; p < len; ++p) {
          const float* vv = V.data() + (from + p) * kd + kvh * hd;
          const float pr = scores[static_cast<size_t>(p)];
          for (int64_t d = 0; d < hd; ++d) o[d] += pr * vv[d];
        }
      }
    }
  }
  linear(attn.data(), t, A.o, A.o_bias.empty() ? nullptr : A.o_bias.data(), out);
}

void decoder::attention_mla(int layer, const float* x, std::span<sequence_step> batch,
                            const std::vector<int64_t>& offsets, float* out) {
  const auto& c = w_.config;
  const auto& A = w_.layers[static_cast<size_t>(layer)].attn;
  const int64_t t = offsets.back();
  const int nh = c.num_heads;
  const int64_t nope = c.qk_nope_head_dim, rd = c.qk_rope_head_dim, vd = c.v_head_dim, rank = c.kv_lora_rank;
  const int64_t qhd = nope + rd;
  std::vector<float> q(static_cast<size_t>(t * nh * qhd));
  if (c.q_lora_rank > 0) {
    std::vector<float> qa(static_cast<size_t>(t * c.q_lora_rank));
    linear(x, t, A.q_a, nullptr, qa.data());
    rmsnorm(qa.data(), A.q_a_norm.data(), t, c.q_lora_rank, c.rms_norm_eps, qa.data());
    linear(qa.data(), t, A.q_b, nullptr, q.data());
  } else {
    linear(x, t, A.q, nullptr, q.data());
  }
  std::vector<float> kva(static_cast<size_t>(t * (rank + rd)));
  linear(x, t, A.kv_a, nullptr, kva.data());
  // Latent rows normalised in place; rope keys rotated in place.
  for (int64_t r = 0; r < t; ++r) rmsnorm(kva.data() + r * (rank + rd), A.kv_a_norm.data(), 1, rank, c.rms_norm_eps, kva.data() + r * (rank + rd));
  const float* wkvb = A.kv_b.f32();  // [nh·(nope+vd), rank]
  std::vector<float> attn(static_cast<size_t>(t * nh * vd));
  std::vector<float> qabs(static_cast<size_t>(rank)), lat(static_cast<size_t>(rank));
  for (size_t i = 0; i < batch.size(); ++i) {
    auto& cache = *batch[i].cache;
    const int64_t base = cache.length, n = offsets[i + 1] - offsets[i];
    auto& C = cache.a[static_cast<size_t>(layer)];
    auto& R = cache.b[static_cast<size_t>(layer)];
    for (int64_t j = 0; j < n; ++j) {
      const float* row = kva.data() + (offsets[i] + j) * (rank + rd);
      C.insert(C.end(), row, row + rank);
      std::vector<float> kr(row + rank, row + rank + rd);
      rope_.apply(kr.data(), 1, rd, base + j);
      R.insert(R.end(), kr.begin(), kr.end());
      rope_.apply(q.data() + (offsets[i] + j) * nh * qhd + nope, nh, qhd, base + j);
    }
    std::vector<float> scores(static_cast<size_t>(base + n));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t len = base + j + 1;
      for (int hh = 0; hh < nh; ++hh) {
        const float* qh = q.data() + (offsets[i] + j) * nh * qhd + hh * qhd;
        const float* wuk = wkvb + static_cast<int64_t>(hh) * (nope + vd) * rank;
        const float* wuv = wuk + nope * rank;
        // Absorb W_uk into the query: scores come straight from the cached latent.
        std::fill(qabs.begin(), qabs.end(), 0.0f);
        for (int64_t d = 0; d < nope; ++d)
          for (int64_t r = 0; r < rank; ++r) qabs[static_cast<size_t>(r)] += qh[d] * wuk[d * rank + r];
        for (int64_t p = 0; p < len; ++p) {
          const float* cp = C.data() + p * rank;
          const float* rp = R.data() + p * rd;
          float s = 0;
          for (int64_t r = 0; r < rank; ++r) s += qabs[static_cast<size_t>(r)] * cp[r];
          for (int64_t d = 0; d < rd; ++d) s += qh[nope + d] * rp[d];
          scores[static_cast<size_t>(p)] = static_cast<float>(s * softmax_scale_);
        }
        softmax(scores.data(), len);
        std::fill(lat.begin(), lat.end(), 0.0f);
        for (int64_t p = 0; p < len; ++p) {
          const float* cp = C.data() + p * rank;
          const float pr = scores[static_cast<size_t>(p)];
          for (int64_t r = 0; r < rank; ++r) lat[static_cast<size_t>(r)] += pr * cp[r];
        }
        float* o = attn.data() + (offsets[i] + j) * nh * vd + hh * vd;
        for (int64_t d = 0; d < vd; ++d) {
          float s = 0;
          for (int64_t r = 0; r < rank; ++r) s += wuv[d * rank + r] * lat[static_cast<size_t>(r)];
          o[d] = s;
        }
      }
    }
  }
  linear(attn.data(), t, A.o, nullptr, out);
}

}  // namespace sy::model
