#include "apps/device.hpp"

#include "model/error.hpp"

#ifdef SY_HAVE_CUDA
#include "model/cuda/gpu_moe.hpp"
#endif

#include <charconv>

namespace sy::apps {

caf::expected<std::shared_ptr<model::device_experts>> make_device(const std::string& spec) {
  if (spec == "cpu") return std::shared_ptr<model::device_experts>{};
  int index = 0;
  if (spec != "cuda") {
    const std::string prefix = "cuda:";
    const char* end = spec.data() + spec.size();
    if (!spec.starts_with(prefix) || spec.size() == prefix.size() ||
        std::from_chars(spec.data() + prefix.size(), end, index).ptr != end || index < 0)
      return model::make_error(model::model_errc::invalid_argument,
                               "--device: '" + spec + "' is not cpu, cuda or cuda:N");
  }
#ifdef SY_HAVE_CUDA
  return model::cuda::make_device_experts(index);
#else
  return model::make_error(model::model_errc::unsupported,
                           "--device " + spec + ": this build has no CUDA support (built with SWITCHYARD_CUDA=OFF or without nvcc)");
#endif
}

}  // namespace sy::apps
