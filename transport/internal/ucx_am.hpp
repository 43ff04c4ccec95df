#pragma once
/// Active-message ids the UCX link registers on its worker (shared with tests that speak raw UCX).
namespace sy::transport::internal {

inline constexpr unsigned am_id_request = 11;  ///< client → server: request frames
inline constexpr unsigned am_id_reply = 12;    ///< server → client: reply and error frames

}  // namespace sy::transport::internal
