#include "model/weights.hpp"

#include "model/family.hpp"

#include <cstdlib>
#include <cstring>
#include <set>

namespace sy::model {

namespace {

class loader {
 public:
  loader(const model_config& cfg, const checkpoint& ckpt, std::optional<dtype> wd)
      : cfg_(cfg), ckpt_(ckpt), names_(cfg), wd_(wd) {}

  dtype storage_for(const tensor_ref& t) const {
    if (wd_) return *wd_;
    return (t.type == dtype::bf16 || t.type == dtype::f8_e4m3) ? dtype::bf16 : dtype::f32;
  }

  /// A [rows, cols] matrix; FP8 weights are dequantised with their block scales.
  caf::expected<matrix> mat(const std::string& name, int64_t rows, int64_t cols, std::optional<dtype> force = {}) {
    auto t = ckpt_.get(name, {rows, cols});
    if (!t) return t.error();
    const tensor_ref& r = **t;
    bytes_ += r.nbytes;
    dtype st = force ? *force : storage_for(r);
    if (r.type == dtype::f8_e4m3) return dequant_fp8(r, rows, cols, st);
    if (r.type != dtype::f32 && r.type != dtype::bf16 && r.type != dtype::f16)
      return make_error(model_errc::bad_value, r.file + ": tensor '" + name + "' has dtype " + dtype_name(r.type) +
                                                   "; expected F32, BF16, F16 or F8_E4M3");
    return matrix::from(st, r.type, r.data, rows, cols);
  }

  caf::expected<std::vector<float>> vec(const std::string& name, int64_t n) {
    auto t = ckpt_.get(name, {n});
    if (!t) return t.error();
    bytes_ += (*t)->nbytes;
    return read_f32(**t);
  }

  /// Expert FFN from three projections [F, H], [F, H], [H, F]; accepts transformers 5's fused
  /// per-layer tensors (experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F]) too.
  caf::expected<expert_weights> ffn(const std::string& gate, const std::string& up, const std::string& down,
                                    int64_t f) {
    const int64_t h = cfg_.hidden_size;
    auto g = ckpt_.get(gate, {f, h});
    if (!g) return g.error();
    auto u = ckpt_.get(up, {f, h});
    if (!u) return u.error();
    dtype st = storage_for(**g);
    expert_weights w;
    w.gate_up = matrix(st, 2 * f, h);
    auto gm = mat(gate, f, h, st);
    if (!gm) return gm.error();
    auto um = mat(up, f, h, st);
    if (!um) return um.error();
    const size_t half = gm->bytes();
    std::memcpy(w.gate_up.raw(), gm->raw(), half);
    std::memcpy(w.gate_up.raw() + half, um->raw(), half);
    auto d = mat(down, h, f, st);
    if (!d) return d.error();
    w.down = std::move(*d);
    w.pack();
    return w;
  }

  caf::expected<expert_weights> routed_expert(int l, int e) {
    const int64_t f = cfg_.moe_intermediate_size, h = cfg_.hidden_size;
    const auto& s = names_.spec;
    if (ckpt_.find(names_.expert(l, e, s.expert_gate)))
      return ffn(names_.expert(l, e, s.expert_gate), names_.expert(l, e, s.expert_up),
                 names_.expert(l, e, s.expert_down), f);
    auto fused_gu = names_.moe(l, "experts.gate_up_proj");
    auto fused_d = names_.moe(l, "experts.down_proj");
    if (!ckpt_.find(fused_gu)) return ckpt_.get(names_.expert(l, e, s.expert_gate)).error();
    const int64_t ne = cfg_.gating.num_experts;
    auto gu = ckpt_.get(fused_gu, {ne, 2 * f, h});
    if (!gu) return gu.error();
    auto dn = ckpt_.get(fused_d, {ne, h, f});
    if (!dn) return dn.error();
    expert_weights w;
    const size_t es = dtype_size((*gu)->type);
    w.gate_up = matrix::from(storage_for(**gu), (*gu)->type, (*gu)->data + static_cast<size_t>(e * 2 * f * h) * es, 2 * f, h);
    w.down = matrix::from(storage_for(**dn), (*dn)->type, (*dn)->data + static_cast<size_t>(e * h * f) * es, h, f);
    bytes_ += w.bytes();
    w.pack();
    return w;
  }

  size_t bytes() const { return bytes_; }
  const tensor_names& names() const { return names_; }

 private:
  caf::expected<matrix> dequant_fp8(const tensor_ref& r, int64_t rows, int64_t cols, dtype st) {
    if (cfg_.fp8_block.size() != 2)
      return make_error(model_errc::bad_value, r.file + ": tensor '" + r.name +
                                                   "' is F8_E4M3 but config.json has no quantization_config.weight_block_size");
    const int64_t br = cfg_.fp8_block[0], bc = cfg_.fp8_block[1];
    const int64_t sr = (rows + br - 1) / br, sc = (cols + bc - 1) / bc;
    std::string scale_name = r.name;
    if (scale_name.size() > 7 && scale_name.ends_with(".weight")) scale_name += "_scale_inv";
    auto s = ckpt_.get(scale_name, {sr, sc});
    if (!s) return s.error();
    auto scales = read_f32(**s);
    if (!scales) return scales.error();
    std::vector<float> row(static_cast<size_t>(cols));
    matrix m(st, rows, cols);
    const auto* q = reinterpret_cast<const uint8_t*>(r.data);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j)
        row[static_cast<size_t>(j)] = f8e4m3_to_f32(q[i * cols + j]) * (*scales)[static_cast<size_t>((i / br) * sc + j / bc)];
      if (st == dtype::f32) {
        std::memcpy(m.f32() + i * cols, row.data(), static_cast<size_t>(cols) * 4);
      } else {
        for (int64_t j = 0; j < cols; ++j) m.bf16()[i * cols + j] = f32_to_bf16(row[static_cast<size_t>(j)]);
      }
    }
    return m;
  }

  const model_config& cfg_;
  const checkpoint& ckpt_;
  tensor_names names_;
  std::optional<dtype> wd_;
  size_t bytes_ = 0;
};

caf::error load_attention(loader& ld, const model_config& c, int l, attention_weights& a) {
  const auto& n = ld.names();
  const int64_t h = c.hidden_size;
  auto take = [](auto&& exp, auto& dst) -> caf::error {
    if (!exp) return exp.error();
    dst = std::move(*exp);
    return {};
  };
  if (c.attention == attention_kind::gqa) {
    const int64_t qd = c.num_heads * c.head_dim, kd = c.num_kv_heads * c.head_dim;
    if (auto e = take(ld.mat(n.attn(l, "q_proj.weight"), qd, h), a.q)) return e;
    if (auto e = take(ld.mat(n.attn(l, "k_proj.weight"), kd, h), a.k)) return e;
    if (auto e = take(ld.mat(n.attn(l, "v_proj.weight"), kd, h), a.v)) return e;
    if (auto e = take(ld.mat(n.attn(l, "o_proj.weight"), h, qd), a.o)) return e;
    if (c.qkv_bias) {
      if (auto e = take(ld.vec(n.attn(l, "q_proj.bias"), qd), a.q_bias)) return e;
      if (auto e = take(ld.vec(n.attn(l, "k_proj.bias"), kd), a.k_bias)) return e;
      if (auto e = take(ld.vec(n.attn(l, "v_proj.bias"), kd), a.v_bias)) return e;
    }
    if (c.o_bias)
      if (auto e = take(ld.vec(n.attn(l, "o_proj.bias"), h), a.o_bias)) return e;
    if (c.qk_norm == qk_norm_kind::per_head) {
      if (auto e = take(ld.vec(n.attn(l, "q_norm.weight"), c.head_dim), a.q_norm)) return e;
      if (auto e = take(ld.vec(n.attn(l, "k_norm.weight"), c.head_dim), a.k_norm)) return e;
    } else if (c.qk_norm == qk_norm_kind::whole) {
      if (auto e = take(ld.vec(n.attn(l, "q_norm.weight"), qd), a.q_norm)) return e;
      if (auto e = take(ld.vec(n.attn(l, "k_norm.weight"), kd), a.k_norm)) return e;
    }
    return {};
  }
  // Multi-head latent attention.
  const int64_t qhd = c.qk_nope_head_dim + c.qk_rope_head_dim;
  const int64_t nh = c.num_heads;
  if (c.q_lora_rank > 0) {
    if (auto e = take(ld.mat(n.attn(l, "q_a_proj.weight"), c.q_lora_rank, h), a.q_a)) return e;
    if (auto e = take(ld.vec(n.attn(l, "q_a_layernorm.weight"), c.q_lora_rank), a.q_a_norm)) return e;
    if (auto e = take(ld.mat(n.attn(l, "q_b_proj.weight"), nh * qhd, c.q_lora_rank), a.q_b)) return e;
  } else {
    if (auto e = take(ld.mat(n.attn(l, "q_proj.weight"), nh * qhd, h), a.q)) return e;
  }
  if (auto e = take(ld.mat(n.attn(l, "kv_a_proj_with_mqa.weight"), c.kv_lora_rank + c.qk_rope_head_dim, h), a.kv_a))
    return e;
  if (auto e = take(ld.vec(n.attn(l, "kv_a_layernorm.weight"), c.kv_lora_rank), a.kv_a_norm)) return e;
  // kv_b stays f32: the absorbed decode path reads it per head, and it is small.
  if (auto e = take(ld.mat(n.attn(l, "kv_b_proj.weight"), nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank,
                           dtype::f32),
                    a.kv_b))
    return e;
  if (auto e = take(ld.mat(n.attn(l, "o_proj.weight"), h, nh * c.v_head_dim), a.o)) return e;
  return {};
}

}  // namespace

caf::expected<expert_weights> load_expert(const model_config& cfg, const checkpoint& ckpt, int layer, int expert,
                                          std::optional<dtype> weight_dtype) {
  if (layer < 0 || layer >= cfg.num_layers || !cfg.moe_layer[static_cast<size_t>(layer)])
    return make_error(model_errc::invalid_argument, "layer " + std::to_string(layer) + " has no routed experts");
  if (expert < 0 || expert >= cfg.gating.num_experts)
    return make_error(model_errc::invalid_argument, "expert " + std::to_string(expert) + " is out of range");
  loader ld(cfg, ckpt, weight_dtype);
  return ld.routed_expert(layer, expert);
}

caf::expected<std::unique_ptr<model_weights>> load_model(const std::filesystem::path& dir, const load_options& opts) {
  auto cfg = load_config(dir);
  if (!cfg) return cfg.error();
  auto ckpt = checkpoint::open(dir);
  if (!ckpt) return ckpt.error();
  return load_model(*cfg, *ckpt, opts);
}

caf::expected<std::unique_ptr<model_weights>> load_model(const model_config& c, const checkpoint& ckpt,
                                                         const load_options& opts) {
  auto w = std::make_unique<model_weights>();
  w->config = c;
  loader ld(c, ckpt, opts.weight_dtype);
  const auto& n = ld.names();
  const size_t total = ckpt.total_bytes();
  auto tick = [&] {
    if (opts.progress) opts.progress(ld.bytes(), total);
  };
  const int64_t h = c.hidden_size;
  if (opts.notice) {
    // Layers past num_hidden_layers (DeepSeek's multi-token-prediction modules) are not served.
    size_t skipped = 0;
    std::set<int> layers;
    for (const auto& name : ckpt.names()) {
      if (!name.starts_with("model.layers.")) continue;
      const int l = std::atoi(name.c_str() + 13);
      if (l >= c.num_layers) {
        ++skipped;
        layers.insert(l);
      }
    }
    if (skipped)
      opts.notice("skipping " + std::to_string(skipped) + " tensors of " + std::to_string(layers.size()) +
                  " layer(s) past num_hidden_layers (multi-token prediction, from model.layers." +
                  std::to_string(*layers.begin()) + "): not used for serving");
  }
  if (opts.dense) {
    auto emb = ld.mat("model.embed_tokens.weight", c.vocab_size, h);
    if (!emb) return emb.error();
    w->embed = std::move(*emb);
    auto fn = ld.vec("model.norm.weight", h);
    if (!fn) return fn.error();
    w->final_norm = std::move(*fn);
    // Tied: the output matrix is the embedding, as transformers ties them, even where the file
    // also carries an lm_head.weight.
    if (!c.tie_word_embeddings) {
      auto head = ld.mat("lm_head.weight", c.vocab_size, h);
      if (!head) return head.error();
      w->lm_head = std::move(*head);
    }
  }
  w->layers.resize(static_cast<size_t>(c.num_layers));
  w->experts.resize(static_cast<size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    auto& L = w->layers[static_cast<size_t>(l)];
    const bool sparse = c.moe_layer[static_cast<size_t>(l)];
    if (opts.dense) {
      auto in = ld.vec(n.layer(l) + "input_layernorm.weight", h);
      if (!in) return in.error();
      L.input_norm = std::move(*in);
      auto post = ld.vec(n.layer(l) + "post_attention_layernorm.weight", h);
      if (!post) return post.error();
      L.post_norm = std::move(*post);
      if (auto e = load_attention(ld, c, l, L.attn)) return e;
      if (!sparse) {
        const auto& s = n.spec;
        auto d = ld.ffn(n.dense(l, s.dense_gate), n.dense(l, s.dense_up), n.dense(l, s.dense_down), c.intermediate_size);
        if (!d) return d.error();
        L.dense_mlp = std::make_unique<expert_weights>(std::move(*d));
      } else {
        auto r = ld.mat(n.moe(l, n.spec.router + ".weight"), c.gating.num_experts, h, dtype::f32);
        if (!r) return r.error();
        L.moe.router = std::move(*r);
        if (c.gating.has_score_bias) {
          auto b = ld.vec(n.moe(l, n.spec.router + ".e_score_correction_bias"), c.gating.num_experts);
          if (!b) return b.error();
          L.moe.score_bias = std::move(*b);
        }
        if (c.shared_expert_intermediate_size > 0) {
          const auto& s = n.spec;
          auto sh = ld.ffn(n.shared(l, s.dense_gate), n.shared(l, s.dense_up), n.shared(l, s.dense_down),
                           c.shared_expert_intermediate_size);
          if (!sh) return sh.error();
          L.moe.shared = std::make_unique<expert_weights>(std::move(*sh));
          if (c.shared_expert_gate) {
            auto g = ld.mat(n.moe(l, s.shared_gate + ".weight"), 1, h, dtype::f32);
            if (!g) return g.error();
            L.moe.shared_gate = std::move(*g);
          }
        }
      }
      tick();
    }
    if (sparse) {
      auto& E = w->experts[static_cast<size_t>(l)].experts;
      E.resize(static_cast<size_t>(c.gating.num_experts));
      for (int e = 0; e < c.gating.num_experts; ++e) {
        if (opts.want_expert && !opts.want_expert(l, e)) continue;
        auto x = ld.routed_expert(l, e);
        if (!x) return x.error();
        E[static_cast<size_t>(e)] = std::make_unique<expert_weights>(std::move(*x));
      }
      tick();
    }
  }
  return w;
}

}  // namespace sy::model
