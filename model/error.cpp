#include "model/error.hpp"

#include <caf/atom.hpp>
#include <caf/make_message.hpp>
#include <caf/message.hpp>

namespace sy::model {

caf::error make_error(model_errc code, std::string message) {
  return caf::error(static_cast<uint8_t>(code), caf::atom("model"), caf::make_message(std::move(message)));
}

std::string describe(const caf::error& err) {
  if (!err) return "no error";
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0)) return ctx.get_as<std::string>(0);
  return to_string(err);
}

const char* to_string(model_errc code) {
  switch (code) {
    case model_errc::none: return "none";
    case model_errc::io_error: return "io_error";
    case model_errc::bad_format: return "bad_format";
    case model_errc::missing_key: return "missing_key";
    case model_errc::bad_value: return "bad_value";
    case model_errc::unsupported: return "unsupported";
    case model_errc::invalid_argument: return "invalid_argument";
  }
  return "unknown";
}

}  // namespace sy::model
