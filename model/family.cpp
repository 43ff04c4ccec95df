#include "model/family.hpp"

namespace sy::model {

const family_spec& spec_of(family_id f) {
  auto hf = [](family_id id, std::string shared_block = "", std::string shared_gate = "") {
    return family_spec{.id = id, .moe_block = "mlp", .dense_block = "mlp", .expert_gate = "gate_proj",
                       .expert_up = "up_proj", .expert_down = "down_proj", .dense_gate = "gate_proj",
                       .dense_up = "up_proj", .dense_down = "down_proj", .router = "gate",
                       .shared_block = std::move(shared_block), .shared_gate = std::move(shared_gate)};
  };
  static const family_spec mixtral{.id = family_id::mixtral, .moe_block = "block_sparse_moe", .dense_block = "mlp",
                                   .expert_gate = "w1", .expert_up = "w3", .expert_down = "w2",
                                   .dense_gate = "gate_proj", .dense_up = "up_proj", .dense_down = "down_proj",
                                   .router = "gate", .shared_block = "", .shared_gate = ""};
  static const family_spec qwen2 = hf(family_id::qwen2_moe, "shared_expert", "shared_expert_gate");
  static const family_spec qwen3 = hf(family_id::qwen3_moe);
  static const family_spec olmoe = hf(family_id::olmoe);
  static const family_spec dsv2 = hf(family_id::deepseek_v2, "shared_experts");
  static const family_spec dsv3 = hf(family_id::deepseek_v3, "shared_experts");
  switch (f) {
    case family_id::mixtral: return mixtral;
    case family_id::qwen2_moe: return qwen2;
    case family_id::qwen3_moe: return qwen3;
    case family_id::olmoe: return olmoe;
    case family_id::deepseek_v2: return dsv2;
    case family_id::deepseek_v3: return dsv3;
  }
  return mixtral;
}

}  // namespace sy::model
