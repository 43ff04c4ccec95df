// `switchyard ctl`: operator commands against a running router's admin routes.
#include "apps/cli.hpp"
#include "apps/commands.hpp"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>

namespace sy::apps {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = boost::asio::ip::tcp;

/// One HTTP request with the admin bearer token; returns (status, body). Fails naming the router.
std::pair<int, std::string> admin_request(const std::string& router, http::verb verb, const std::string& target) {
  auto [host, port] = parse_host_port(router, "--router");
  const char* token = std::getenv("SWITCHYARD_ADMIN_TOKEN");
  if (!token || !*token) fail("SWITCHYARD_ADMIN_TOKEN is not set: admin routes need the router's admin token");
  try {
    boost::asio::io_context io;
    tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.connect(resolver.resolve(host, std::to_string(port)));
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, host);
    req.set(http::field::authorization, std::string("Bearer ") + token);
    req.set(http::field::content_type, "application/json");
    req.body() = "{}";
    req.prepare_payload();
    http::write(stream, req);
    beast::flat_buffer buf;
    http::response<http::string_body> res;
    http::read(stream, buf, res);
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    return {static_cast<int>(res.result_int()), res.body()};
  } catch (const std::exception& e) {
    fail("--router " + router + ": " + e.what());
  }
}

}  // namespace

void add_ctl_commands(CLI::App& app) {
  auto* ctl = app.add_subcommand("ctl", "Operator commands against a running router (token: SWITCHYARD_ADMIN_TOKEN)");
  ctl->require_subcommand(1);
  auto router = std::make_shared<std::string>();
  auto* cl = ctl->add_subcommand("cluster", "Print the hosts, their slots and state, and the placement table");
  cl->add_option("--router", *router, "Router HTTP address HOST:PORT")->required();
  auto as_json = std::make_shared<bool>(false);
  cl->add_flag("--json", *as_json, "Print the JSON the router answers");
  cl->callback([router, as_json] {
    auto [status, body] = admin_request(*router, http::verb::get, "/admin/cluster");
    auto j = nlohmann::json::parse(body, nullptr, false);
    if (status != 200 || j.is_discarded()) fail("cluster: HTTP " + std::to_string(status) + ": " + body);
    if (*as_json) {
      std::printf("%s\n", j.dump(2).c_str());
      return;
    }
    std::printf("placement epoch %llu\n\n", j["epoch"].get<unsigned long long>());
    std::printf("%-4s %-24s %-28s %6s %9s %s\n", "id", "host", "data address", "slots", "replicas", "state");
    for (const auto& h : j["hosts"])
      std::printf("%-4d %-24s %-28s %6d %9d %s\n", h["id"].get<int>(), h["name"].get<std::string>().c_str(),
                  h["address"].get<std::string>().c_str(), h["slots"].get<int>(), h["replicas"].get<int>(),
                  h["up"].get<bool>() ? "up" : "DOWN");
    std::printf("\n%-6s %-7s %s\n", "layer", "expert", "replicas (host:share)");
    for (const auto& layer : j["layers"]) {
      int e = 0;
      for (const auto& reps : layer["experts"]) {
        std::string line;
        for (const auto& r : reps) {
          char buf[64];
          std::snprintf(buf, sizeof buf, "%s%d:%.2f%s", line.empty() ? "" : "  ", r["host"].get<int>(), r["share"].get<double>(),
                        r["ready"].get<bool>() ? "" : " (loading)");
          line += buf;
        }
        std::printf("%-6d %-7d %s\n", layer["layer"].get<int>(), e++, line.c_str());
      }
    }
  });
  auto* rb = ctl->add_subcommand("rebalance", "Plan and apply a rebalancing round now; prints its summary");
  rb->add_option("--router", *router, "Router HTTP address HOST:PORT")->required();
  rb->callback([router] {
    auto [status, body] = admin_request(*router, http::verb::post, "/admin/rebalance");
    auto j = nlohmann::json::parse(body, nullptr, false);
    if (status != 200) fail("rebalance: HTTP " + std::to_string(status) + ": " + (j.is_discarded() ? body : j.dump()));
    if (j.is_discarded()) fail("rebalance: the router answered something that is not JSON: " + body);
    std::printf("%s\n", j.dump(2).c_str());
    if (j.value("status", "") == "failed") std::exit(1);
  });
}

}  // namespace sy::apps
