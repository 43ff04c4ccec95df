#pragma once
/// Small helpers every subcommand shares.
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace sy::model {
class tokenizer;
}

namespace sy::apps {

/// Prints `error: MSG` to stderr and ends the subcommand with exit status 1.
[[noreturn]] void fail(const std::string& msg);

/// Splits HOST:PORT (port 0..65535); a malformed value fails naming `flag`.
[[nodiscard]] std::pair<std::string, uint16_t> parse_host_port(const std::string& s, const char* flag);

/// The admin bearer token from SWITCHYARD_ADMIN_TOKEN; without one, logs that /admin/* stays
/// closed and how to open it.
[[nodiscard]] std::string admin_token_from_env();

/// Loads the tokenizer for serving: `path` when given (a tokenizer.json or a folder holding one),
/// else the model folder's tokenizer.json if there is one; null when there is none (token-id
/// prompts only). A tokenizer that is there but broken fails naming the file.
[[nodiscard]] std::shared_ptr<const model::tokenizer> load_serving_tokenizer(const std::string& path, const std::string& model_dir);

/// Blocks until SIGINT or SIGTERM.
void wait_for_stop_signal();

}  // namespace sy::apps
