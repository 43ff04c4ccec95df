#pragma once
/// Small helpers every subcommand shares.
#include <cstdint>
#include <string>
#include <utility>

namespace sy::apps {

/// Prints `error: MSG` to stderr and ends the subcommand with exit status 1.
[[noreturn]] void fail(const std::string& msg);

/// Splits HOST:PORT (port 0..65535); a malformed value fails naming `flag`.
[[nodiscard]] std::pair<std::string, uint16_t> parse_host_port(const std::string& s, const char* flag);

/// The admin bearer token from SWITCHYARD_ADMIN_TOKEN; without one, logs that /admin/* stays
/// closed and how to open it.
[[nodiscard]] std::string admin_token_from_env();

/// Blocks until SIGINT or SIGTERM.
void wait_for_stop_signal();

}  // namespace sy::apps
