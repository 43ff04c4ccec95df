#pragma once
/// Errors of the model layer. Every fallible function of `sy::model` returns `caf::expected<T>`
/// whose error carries a `model_errc` code (category "model") and one human-readable message that
/// names the file and the key or tensor at fault.
#include <caf/error.hpp>
#include <caf/expected.hpp>

#include <cstdint>
#include <string>

namespace sy::model {

enum class model_errc : uint8_t {
  none = 0,
  io_error,          ///< a file could not be opened, mapped or written
  bad_format,        ///< malformed file (header, JSON, offsets)
  missing_key,       ///< a required config key or tensor is absent
  bad_value,         ///< a value is present but wrong (shape, range, type)
  unsupported,       ///< understood, but this build does not implement it
  invalid_argument,  ///< a caller passed something inconsistent
};

/// Builds an error of the model category carrying `message`.
[[nodiscard]] caf::error make_error(model_errc code, std::string message);

/// Returns the message of an error built by any layer's `make_error`, or CAF's rendering otherwise.
[[nodiscard]] std::string describe(const caf::error& err);

/// Returns the name of a code ("bad_format", ...).
[[nodiscard]] const char* to_string(model_errc code);

}  // namespace sy::model
