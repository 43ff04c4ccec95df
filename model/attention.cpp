#include "model/attention.hpp"

#include "model/kernels.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace sy::model {

namespace {

/// Score rows per chunk: keeps the [rows, len] score matrix near 64 MiB for long prefills.
int64_t query_chunk(int64_t heads_per_row, int64_t len) {
  return std::max<int64_t>(1, (int64_t{16} << 20) / std::max<int64_t>(1, heads_per_row * len));
}

void gemm(bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

/// Scales row r's scores, masks positions past `last(r)` (and before `first(r)`), and softmaxes.
template <class First, class Last>
void masked_softmax(float* s, int64_t rows, int64_t len, double scale, First first, Last last) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * len;
    const int64_t lo = first(r), hi = last(r);  // inclusive range of visible positions
    for (int64_t p = lo; p <= hi; ++p) row[p] = static_cast<float>(row[p] * scale);
    softmax(row + lo, hi - lo + 1);
    std::fill(row, row + lo, 0.0f);
    std::fill(row + hi + 1, row + len, 0.0f);
  }
}

}  // namespace

int64_t cache_width_a(const model_config& c) {
  return c.attention == attention_kind::mla ? c.kv_lora_rank : c.num_kv_heads * c.head_dim;
}
int64_t cache_width_b(const model_config& c) {
  return c.attention == attention_kind::mla ? c.qk_rope_head_dim : c.num_kv_heads * c.head_dim;
}

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

attention::attention(const model_config& c) : c_(c) {
  rope_ = rope_table(c.rope, c.attention == attention_kind::mla ? c.qk_rope_head_dim : c.head_dim);
  softmax_scale_ = 1.0 / std::sqrt(static_cast<double>(c.q_head_dim()));
  if (c.attention == attention_kind::mla && c.rope.type == "yarn" && c.rope.mscale_all_dim != 0) {
    const double m = c.rope.factor <= 1 ? 1.0 : 0.1 * c.rope.mscale_all_dim * std::log(c.rope.factor) + 1.0;
    softmax_scale_ *= m * m;
  }
}

void attention::forward(int layer, const attention_weights& w, const float* x, std::span<const attention_seq> seqs,
                        float* out) const {
  if (c_.attention == attention_kind::mla)
    mla(layer, w, x, seqs, out);
  else
    gqa(layer, w, x, seqs, out);
}

void attention::gqa(int layer, const attention_weights& A, const float* x, std::span<const attention_seq> seqs,
                    float* out) const {
  const auto& c = c_;
  const int64_t t = seqs.empty() ? 0 : seqs.back().end;
  const int64_t nh = c.num_heads, nkv = c.num_kv_heads, group = nh / nkv;
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
  std::vector<float> attn(static_cast<size_t>(t * qd)), qg, s, o;
  for (const auto& sq : seqs) {
    auto& cache = *sq.cache;
    const int64_t base = cache.length, n = sq.end - sq.begin, len = base + n;
    auto& K = cache.a[static_cast<size_t>(layer)];
    auto& V = cache.b[static_cast<size_t>(layer)];
    for (int64_t j = 0; j < n; ++j) {
      rope_.apply(q.data() + (sq.begin + j) * qd, static_cast<int>(nh), hd, base + j);
      rope_.apply(k.data() + (sq.begin + j) * kd, static_cast<int>(nkv), hd, base + j);
    }
    K.insert(K.end(), k.begin() + sq.begin * kd, k.begin() + sq.end * kd);
    V.insert(V.end(), v.begin() + sq.begin * kd, v.begin() + sq.end * kd);
    // Per kv head: the group's query rows against its keys, as GEMMs over the cache.
    const int64_t chunk = query_chunk(group, len);
    for (int64_t g = 0; g < nkv; ++g)
      for (int64_t j0 = 0; j0 < n; j0 += chunk) {
        const int64_t m = std::min(chunk, n - j0), rows = m * group;
        qg.resize(static_cast<size_t>(rows * hd));
        for (int64_t j = 0; j < m; ++j)
          std::memcpy(qg.data() + j * group * hd, q.data() + (sq.begin + j0 + j) * qd + g * group * hd,
                      static_cast<size_t>(group * hd) * 4);
        s.resize(static_cast<size_t>(rows * len));
        gemm(true, rows, len, hd, qg.data(), hd, K.data() + g * hd, kd, 0.0f, s.data(), len);
        masked_softmax(
            s.data(), rows, len, softmax_scale_,
            [&](int64_t r) { return window > 0 ? std::max<int64_t>(0, base + j0 + r / group - window + 1) : 0; },
            [&](int64_t r) { return base + j0 + r / group; });
        o.resize(static_cast<size_t>(rows * hd));
        gemm(false, rows, hd, len, s.data(), len, V.data() + g * hd, kd, 0.0f, o.data(), hd);
        for (int64_t j = 0; j < m; ++j)
          std::memcpy(attn.data() + (sq.begin + j0 + j) * qd + g * group * hd, o.data() + j * group * hd,
                      static_cast<size_t>(group * hd) * 4);
      }
  }
  linear(attn.data(), t, A.o, A.o_bias.empty() ? nullptr : A.o_bias.data(), out);
}

void attention::mla(int layer, const attention_weights& A, const float* x, std::span<const attention_seq> seqs,
                    float* out) const {
  const auto& c = c_;
  const int64_t t = seqs.empty() ? 0 : seqs.back().end;
  const int64_t nh = c.num_heads;
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
  const float* wkvb = A.kv_b.f32();  // [nh·(nope+vd), rank]: per head W_uk [nope, rank] then W_uv [vd, rank]
  const int64_t head_rows = nope + vd;
  std::vector<float> attn(static_cast<size_t>(t * nh * vd)), qabs, s, lat;
  for (const auto& sq : seqs) {
    auto& cache = *sq.cache;
    const int64_t base = cache.length, n = sq.end - sq.begin, len = base + n;
    auto& C = cache.a[static_cast<size_t>(layer)];
    auto& R = cache.b[static_cast<size_t>(layer)];
    for (int64_t j = 0; j < n; ++j) {
      float* row = kva.data() + (sq.begin + j) * (rank + rd);
      rmsnorm(row, A.kv_a_norm.data(), 1, rank, c.rms_norm_eps, row);
      rope_.apply(row + rank, 1, rd, base + j);
      C.insert(C.end(), row, row + rank);
      R.insert(R.end(), row + rank, row + rank + rd);
      rope_.apply(q.data() + (sq.begin + j) * nh * qhd + nope, static_cast<int>(nh), qhd, base + j);
    }
    // Absorbed attention over the compressed cache: the query's nope part is mapped into the latent
    // space (q · W_uk), scores are taken against the latents and the rope keys, and the weighted sum
    // of latents is mapped out through W_uv. Per-head K and V are never formed.
    const int64_t chunk = query_chunk(nh, len);
    for (int64_t j0 = 0; j0 < n; j0 += chunk) {
      const int64_t m = std::min(chunk, n - j0), rows = m * nh;
      const float* qrows = q.data() + (sq.begin + j0) * nh * qhd;  // [(m·nh), qhd]
      qabs.resize(static_cast<size_t>(rows * rank));
      for (int64_t h = 0; h < nh; ++h)
        gemm(false, m, rank, nope, qrows + h * qhd, nh * qhd, wkvb + h * head_rows * rank, rank, 0.0f,
             qabs.data() + h * rank, nh * rank);
      s.resize(static_cast<size_t>(rows * len));
      gemm(true, rows, len, rank, qabs.data(), rank, C.data(), rank, 0.0f, s.data(), len);
      gemm(true, rows, len, rd, qrows + nope, qhd, R.data(), rd, 1.0f, s.data(), len);
      masked_softmax(
          s.data(), rows, len, softmax_scale_, [](int64_t) { return int64_t{0}; },
          [&](int64_t r) { return base + j0 + r / nh; });
      lat.resize(static_cast<size_t>(rows * rank));
      gemm(false, rows, rank, len, s.data(), len, C.data(), rank, 0.0f, lat.data(), rank);
      float* orows = attn.data() + (sq.begin + j0) * nh * vd;
      for (int64_t h = 0; h < nh; ++h)
        gemm(true, m, vd, rank, lat.data() + h * rank, nh * rank, wkvb + (h * head_rows + nope) * rank, rank, 0.0f,
             orows + h * vd, nh * vd);
    }
  }
  linear(attn.data(), t, A.o, nullptr, out);
}

}  // namespace sy::model
