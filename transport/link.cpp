#include "transport/link.hpp"

#include <memory>

namespace sy::transport {

uint64_t link_stats::errors_total() const {
  uint64_t n = 0;
  for (auto e : errors) n += e;
  return n;
}

link_stats& link_stats::operator+=(const link_stats& o) {
  requests_sent += o.requests_sent;
  replies_received += o.replies_received;
  errors_received += o.errors_received;
  late_replies += o.late_replies;
  requests_received += o.requests_received;
  replies_sent += o.replies_sent;
  errors_sent += o.errors_sent;
  bytes_sent += o.bytes_sent;
  bytes_received += o.bytes_received;
  links_closed += o.links_closed;
  for (size_t i = 0; i < errors.size(); ++i) errors[i] += o.errors[i];
  return *this;
}

std::future<caf::expected<reply>> link_client::call(request req, std::chrono::milliseconds timeout) {
  auto promise = std::make_shared<std::promise<caf::expected<reply>>>();
  auto future = promise->get_future();
  send(std::move(req), timeout, [promise](caf::expected<reply> r) { promise->set_value(std::move(r)); });
  return future;
}

caf::expected<reply> link_client::call_sync(request req, std::chrono::milliseconds timeout) {
  return call(std::move(req), timeout).get();
}

}  // namespace sy::transport
