#pragma once
/// The family registry: how each architecture names its tensors. Adding a family means adding an
/// entry here and its config keys in config.cpp; the loader and the math read only this.
#include "model/config.hpp"

#include <string>

namespace sy::model {

struct family_spec {
  family_id id;
  std::string moe_block;      ///< sub-module of a sparse layer: "block_sparse_moe" or "mlp"
  std::string dense_block;    ///< sub-module of a dense layer's MLP: "mlp"
  std::string expert_gate;    ///< per-expert projections (w1/w3/w2 or gate_proj/up_proj/down_proj)
  std::string expert_up;
  std::string expert_down;
  std::string dense_gate = "gate_proj", dense_up = "up_proj", dense_down = "down_proj";
  std::string router = "gate";
  std::string shared_block;   ///< "" = none
  std::string shared_gate;    ///< "" = none
};

[[nodiscard]] const family_spec& spec_of(family_id f);

/// Tensor names, all ending in ".weight" (or ".bias"/other suffix given by the caller).
struct tensor_names {
  const model_config& cfg;
  const family_spec& spec;
  explicit tensor_names(const model_config& c) : cfg(c), spec(spec_of(c.family)) {}

  [[nodiscard]] std::string layer(int l) const { return "model.layers." + std::to_string(l) + "."; }
  [[nodiscard]] std::string attn(int l, const std::string& what) const { return layer(l) + "self_attn." + what; }
  [[nodiscard]] std::string moe(int l, const std::string& what) const { return layer(l) + spec.moe_block + "." + what; }
  [[nodiscard]] std::string expert(int l, int e, const std::string& proj) const {
    return moe(l, "experts." + std::to_string(e) + "." + proj + ".weight");
  }
  [[nodiscard]] std::string dense(int l, const std::string& proj) const {
    return layer(l) + spec.dense_block + "." + proj + ".weight";
  }
  [[nodiscard]] std::string shared(int l, const std::string& proj) const {
    return moe(l, spec.shared_block + "." + proj + ".weight");
  }
};

}  // namespace sy::model
