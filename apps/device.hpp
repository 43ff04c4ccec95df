#pragma once
/// `--device` for the roles that hold experts: "cpu" (the default) or "cuda[:N]".
#include "model/moe.hpp"

#include <memory>
#include <string>

namespace sy::apps {

/// Null for "cpu"; the CUDA backend for "cuda" / "cuda:N" when this build has it; otherwise an
/// error naming the flag and the value.
[[nodiscard]] caf::expected<std::shared_ptr<model::device_experts>> make_device(const std::string& spec);

}  // namespace sy::apps
