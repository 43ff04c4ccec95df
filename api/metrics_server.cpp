#include "api/metrics_server.hpp"

#include "metrics/metrics.hpp"
#include "model/error.hpp"

#include <boost/asio.hpp>
#include <boost/beast.hpp>

#include <chrono>
#include <optional>
#include <thread>

namespace sy::api {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

namespace {

/// One connection: requests answered in order, keep-alive honoured.
class metrics_session : public std::enable_shared_from_this<metrics_session> {
 public:
  explicit metrics_session(tcp::socket s) : stream_(std::move(s)) {}
  void run() { read(); }

 private:
  void read() {
    req_ = {};
    stream_.expires_after(std::chrono::seconds(60));
    http::async_read(stream_, buffer_, req_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return;  // closed, timed out or malformed
      self->answer();
    });
  }

  void answer() {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string_view target = req_.target();
    const std::string_view path = target.substr(0, target.find('?'));
    auto res = std::make_shared<http::response<http::string_body>>(http::status::ok, req_.version());
    res->set(http::field::server, "switchyard");
    std::string route = "other";
    if (path == "/metrics" || path == "/healthz") route = std::string(path);
    if (req_.method() != http::verb::get && req_.method() != http::verb::head && route != "other") {
      res->result(http::status::method_not_allowed);
      res->set(http::field::content_type, "text/plain");
      res->body() = "use GET\n";
    } else if (path == "/metrics") {
      res->set(http::field::content_type, std::string(metrics::content_type));
      res->body() = metrics::serialize();
    } else if (path == "/healthz") {
      res->set(http::field::content_type, "application/json");
      res->body() = R"({"status":"ok"})";
    } else {
      res->result(http::status::not_found);
      res->set(http::field::content_type, "text/plain");
      res->body() = "this listener serves /metrics and /healthz\n";
    }
    res->keep_alive(req_.keep_alive());
    res->prepare_payload();
    metrics::http_request(route, static_cast<int>(res->result_int()),
                          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec || !res->keep_alive()) {
        beast::error_code ignored;
        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
        return;
      }
      self->read();
    });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> req_;
};

}  // namespace

struct metrics_server::impl {
  net::io_context io;
  tcp::acceptor acceptor{io};
  std::thread thread;
  uint16_t port = 0;

  void accept() {
    acceptor.async_accept(net::make_strand(io), [this](beast::error_code ec, tcp::socket s) {
      if (ec) return;  // closed
      std::make_shared<metrics_session>(std::move(s))->run();
      accept();
    });
  }
};

metrics_server::metrics_server(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
metrics_server::~metrics_server() { stop(); }

caf::expected<std::unique_ptr<metrics_server>> metrics_server::start(const std::string& host, uint16_t port,
                                                                     const std::string& flag) {
  auto p = std::make_unique<impl>();
  beast::error_code ec;
  auto addr = net::ip::make_address(host, ec);
  if (ec) return model::make_error(model::model_errc::invalid_argument, flag + ": '" + host + "' is not an IP address");
  tcp::endpoint ep{addr, port};
  p->acceptor.open(ep.protocol(), ec);
  if (!ec) p->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) p->acceptor.bind(ep, ec);
  if (!ec) p->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return model::make_error(model::model_errc::io_error,
                             flag + ": cannot listen on " + host + ":" + std::to_string(port) + ": " + ec.message());
  p->port = p->acceptor.local_endpoint().port();
  p->accept();
  p->thread = std::thread([raw = p.get()] { raw->io.run(); });
  return std::unique_ptr<metrics_server>(new metrics_server(std::move(p)));
}

uint16_t metrics_server::port() const { return impl_->port; }

void metrics_server::stop() {
  if (!impl_ || !impl_->thread.joinable()) return;
  net::post(impl_->io, [p = impl_.get()] {
    beast::error_code ec;
    p->acceptor.close(ec);
  });
  impl_->io.stop();
  impl_->thread.join();
}

}  // namespace sy::api
