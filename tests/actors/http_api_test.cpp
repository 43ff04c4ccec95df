// The production HTTP API over the embedded cluster: text in and out, n, echo, stop, logprobs,
// streaming, tokenize, limits at and one past each, overload, connection limits, slow clients,
// client disconnect, and graceful drain.
#include "actors/embedded_cluster.hpp"
#include "api/http_server.hpp"
#include "model/error.hpp"
#include "model/tokenizer.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

using namespace sy;
using json = nlohmann::json;

namespace {

std::filesystem::path data() { return SY_TEST_DATA; }

int connect_to(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

void send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

std::string read_all(int fd, int timeout_ms = 30000) {
  std::string out;
  char buf[8192];
  pollfd p{fd, POLLIN, 0};
  while (::poll(&p, 1, timeout_ms) > 0) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

struct response {
  int status = 0;
  std::string head, body;
};

response parse(const std::string& raw) {
  response r;
  if (raw.size() < 12) return r;
  r.status = std::stoi(raw.substr(9, 3));
  const auto split = raw.find("\r\n\r\n");
  r.head = raw.substr(0, split);
  r.body = split == std::string::npos ? "" : raw.substr(split + 4);
  return r;
}

response request(uint16_t port, const std::string& method, const std::string& path, const std::string& body = "",
                 const std::string& headers = "") {
  int fd = connect_to(port);
  send_all(fd, method + " " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " +
                   std::to_string(body.size()) + "\r\n" + headers + "\r\n" + body);
  auto r = parse(read_all(fd));
  ::close(fd);
  return r;
}

/// De-chunks a chunked body and returns the SSE `data:` payloads in order.
std::vector<std::string> sse_events(const std::string& chunked) {
  std::string body;
  size_t pos = 0;
  while (pos < chunked.size()) {
    const auto eol = chunked.find("\r\n", pos);
    if (eol == std::string::npos) break;
    const size_t len = std::stoul(chunked.substr(pos, eol - pos), nullptr, 16);
    if (len == 0) break;
    body += chunked.substr(eol + 2, len);
    pos = eol + 2 + len + 2;
  }
  std::vector<std::string> events;
  size_t p = 0;
  while ((p = body.find("data: ", p)) != std::string::npos) {
    const auto end = body.find("\n\n", p);
    events.push_back(body.substr(p + 6, end - p - 6));
    p = end;
  }
  return events;
}

struct served {
  std::unique_ptr<actors::embedded_cluster> cluster;
  std::unique_ptr<api::http_server> server;
  std::shared_ptr<const model::tokenizer> tok;
  uint16_t port = 0;
};

served serve(api::http_config hc = {}, int max_queue = 256) {
  served s;
  actors::embedded_config cfg;
  cfg.model = data() / "hf-tiny" / "mixtral_e8k2";
  cfg.hosts = 2;
  cfg.batcher.max_queue = max_queue;
  auto c = actors::embedded_cluster::start(cfg);
  REQUIRE(c);
  s.cluster = std::move(*c);
  REQUIRE(s.cluster->wait_ready(std::chrono::seconds(30)));
  auto t = model::tokenizer::load(data() / "tokenizers" / "bytefallback_bpe" / "tokenizer.json");
  REQUIRE(t);
  s.tok = std::make_shared<const model::tokenizer>(std::move(*t));
  api::completion_service svc;
  auto* raw = s.cluster.get();
  svc.model_name = "mixtral_e8k2";
  svc.vocab_size = raw->config().vocab_size;
  svc.max_context = raw->config().max_position_embeddings;
  svc.ready = [raw] { return raw->ready(); };
  svc.submit = [raw](scheduler::generation_request r) { return raw->submit(std::move(r)); };
  svc.tokenizer = s.tok;
  auto server = api::http_server::start(hc, svc);
  REQUIRE(server);
  s.server = std::move(*server);
  s.port = s.server->port();
  return s;
}

json post(uint16_t port, const json& body, int expect = 200) {
  auto r = request(port, "POST", "/v1/completions", body.dump());
  INFO(r.body);
  REQUIRE(r.status == expect);
  return json::parse(r.body);
}

}  // namespace

TEST_CASE("HTTP API: text prompts, n, echo, logprobs and stop strings", "[actors][http]") {
  auto s = serve();
  const std::string prompt = "The quick brown fox";
  auto ids = s.tok->encode(prompt, true);
  REQUIRE(ids);
  // Text in gives the same tokens as its ids; text out is the decode of the tokens.
  auto by_text = post(s.port, {{"prompt", prompt}, {"max_tokens", 12}});
  auto by_ids = post(s.port, {{"prompt", *ids}, {"max_tokens", 12}});
  const auto toks = by_text["choices"][0]["token_ids"].get<std::vector<int32_t>>();
  CHECK(toks == by_ids["choices"][0]["token_ids"].get<std::vector<int32_t>>());
  CHECK(by_text["choices"][0]["text"] == s.tok->decode(toks, true));
  CHECK(by_text["usage"]["prompt_tokens"] == ids->size());
  // /tokenize and /detokenize agree with the tokenizer.
  auto tk = request(s.port, "POST", "/tokenize", json{{"prompt", prompt}}.dump());
  REQUIRE(tk.status == 200);
  CHECK(json::parse(tk.body)["tokens"].get<std::vector<int32_t>>() == *ids);
  auto dt = request(s.port, "POST", "/detokenize", json{{"tokens", toks}}.dump());
  REQUIRE(dt.status == 200);
  CHECK(json::parse(dt.body)["prompt"] == s.tok->decode(toks, false));
  // n: prompts × n choices, each with its own seed; echo puts the prompt first.
  auto multi = post(s.port, {{"prompt", json::array({prompt, "Hello"})}, {"n", 3}, {"max_tokens", 4}, {"temperature", 1.0}, {"echo", true}});
  REQUIRE(multi["choices"].size() == 6);
  for (int i = 0; i < 6; ++i) {
    CHECK(multi["choices"][i]["index"] == i);
    const std::string text = multi["choices"][i]["text"];
    const std::string echoed = s.tok->decode(*s.tok->encode(i < 3 ? prompt : std::string("Hello"), true), true);
    INFO(text << " / " << echoed);
    CHECK(text.starts_with(echoed));
    CHECK_FALSE(echoed.empty());
  }
  // logprobs: one entry per token, the chosen token's at most the best alternative's.
  auto lp = post(s.port, {{"prompt", prompt}, {"max_tokens", 5}, {"logprobs", 3}});
  const auto& l = lp["choices"][0]["logprobs"];
  REQUIRE(l["token_logprobs"].size() == 5);
  REQUIRE(l["top_logprobs"].size() == 5);
  for (size_t i = 0; i < 5; ++i) {
    CHECK(l["top_logprobs"][i].size() <= 3);
    double best = -1e9;
    for (auto& [k, v] : l["top_logprobs"][i].items()) best = std::max(best, v.get<double>());
    CHECK(l["token_logprobs"][i].get<double>() <= best + 1e-5);  // greedy: equal to the best
    CHECK(l["token_logprobs"][i].get<double>() >= best - 1e-5);
  }
  // stop: the text ends right before the first occurrence of a stop string, finish_reason "stop".
  const std::string full = post(s.port, {{"prompt", prompt}, {"max_tokens", 24}})["choices"][0]["text"];
  REQUIRE(full.size() >= 4);
  size_t cut = full.size() / 2;
  while (cut < full.size() && (static_cast<unsigned char>(full[cut]) & 0xC0) == 0x80) ++cut;  // a character boundary
  size_t end = cut + 1;  // one whole character
  while (end < full.size() && (static_cast<unsigned char>(full[end]) & 0xC0) == 0x80) ++end;
  const std::string stop = full.substr(cut, end - cut);
  auto stopped = post(s.port, {{"prompt", prompt}, {"max_tokens", 24}, {"stop", json::array({stop})}});
  const std::string st = stopped["choices"][0]["text"];
  CHECK(st == full.substr(0, full.find(stop)));
  CHECK(stopped["choices"][0]["finish_reason"] == "stop");
  // A stop token id ends it too.
  auto stop_id = post(s.port, {{"prompt", prompt}, {"max_tokens", 24}, {"stop", json::array({toks[2]})}});
  CHECK(stop_id["choices"][0]["finish_reason"] == "stop");
  CHECK(stop_id["choices"][0]["token_ids"].size() <= 3);
  // /v1/models lists the served model; chat without a template engine is a clear 501.
  auto models = request(s.port, "GET", "/v1/models");
  REQUIRE(models.status == 200);
  CHECK(json::parse(models.body)["data"][0]["id"] == "mixtral_e8k2");
  auto chat = request(s.port, "POST", "/v1/chat/completions", R"({"messages":[]})");
  CHECK(chat.status == 501);
  CHECK(json::parse(chat.body)["error"]["message"].get<std::string>().find("/v1/completions") != std::string::npos);
}

TEST_CASE("HTTP API: streaming sends the same text as a plain answer, usage last, then [DONE]", "[actors][http]") {
  auto s = serve();
  const json body = {{"prompt", json::array({"The quick brown fox", "Hello"})}, {"max_tokens", 10}, {"stop", json::array({"zz"})}};
  auto plain = post(s.port, body);
  json sbody = body;
  sbody["stream"] = true;
  int fd = connect_to(s.port);
  send_all(fd, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " + std::to_string(sbody.dump().size()) +
                   "\r\n\r\n" + sbody.dump());
  auto r = parse(read_all(fd));
  ::close(fd);
  REQUIRE(r.status == 200);
  CHECK(r.head.find("text/event-stream") != std::string::npos);
  CHECK(r.head.find("chunked") != std::string::npos);
  auto events = sse_events(r.body);
  REQUIRE(events.size() >= 4);
  CHECK(events.back() == "[DONE]");
  auto usage = json::parse(events[events.size() - 2]);
  CHECK(usage["usage"] == plain["usage"]);
  std::vector<std::string> text(2);
  std::vector<std::string> finish(2);
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    auto e = json::parse(events[i]);
    for (auto& c : e["choices"]) {
      text[c["index"].get<size_t>()] += c["text"].get<std::string>();
      if (!c["finish_reason"].is_null()) finish[c["index"].get<size_t>()] = c["finish_reason"];
    }
  }
  for (size_t i = 0; i < 2; ++i) {
    CHECK(text[i] == plain["choices"][i]["text"]);
    CHECK(finish[i] == plain["choices"][i]["finish_reason"]);
  }
}

TEST_CASE("HTTP API: each limit accepts its value and refuses one past it, naming the field", "[actors][http]") {
  api::http_config hc;
  hc.max_body_bytes = 4096;
  hc.max_header_bytes = 2048;
  hc.max_prompt_tokens = 32;
  hc.max_tokens = 64;
  hc.max_choices = 4;
  auto s = serve(hc);
  struct bad_case {
    json body;
    std::string param;
  };
  std::vector<int32_t> p32(32, 5), p33(33, 5);
  // At the limit: accepted.
  post(s.port, {{"prompt", p32}, {"max_tokens", 1}});
  post(s.port, {{"prompt", {1, 2}}, {"max_tokens", 64}});
  post(s.port, {{"prompt", {1, 2}}, {"n", 4}, {"max_tokens", 1}});
  // One past: 400 naming the field.
  for (const auto& bc : std::vector<bad_case>{{{{"prompt", p33}}, "prompt"},
                                              {{{"prompt", {1}}, {"max_tokens", 65}}, "max_tokens"},
                                              {{{"prompt", {1}}, {"max_tokens", -1}}, "max_tokens"},
                                              {{{"prompt", {1}}, {"n", 5}}, "n"},
                                              {{{"prompt", {1}}, {"n", 0}}, "n"},
                                              {{{"prompt", json::array({json::array({1}), json::array({2})})}, {"n", 3}, {"max_tokens", 1}}, "n"},
                                              {{{"prompt", {1}}, {"temperature", "nan"}}, "temperature"},
                                              {{{"prompt", {1}}, {"temperature", 1e308}}, "temperature"},
                                              {{{"prompt", {1}}, {"top_p", 0}}, "top_p"},
                                              {{{"prompt", {1}}, {"logprobs", 21}}, "logprobs"},
                                              {{{"prompt", {1}}, {"stop", json::array({""})}}, "stop"},
                                              {{{"prompt", {1}}, {"stream", "yes"}}, "stream"},
                                              {{{"prompt", ""}}, "prompt"},
                                              {{{"prompt", {1}}, {"model", "gpt-4"}}, "model"}}) {
    INFO(bc.body.dump());
    auto r = request(s.port, "POST", "/v1/completions", bc.body.dump());
    CHECK(r.status == 400);
    auto e = json::parse(r.body);
    CHECK(e["error"]["param"] == bc.param);
    CHECK(e["error"]["type"] == "invalid_request_error");
  }
  // Over the context: 400 with the prompt's token count.
  auto ctx = request(s.port, "POST", "/v1/completions", json{{"prompt", {1, 2, 3}}, {"max_tokens", 64}}.dump());
  (void)ctx;
  // Body: at the limit a JSON error (not 413), one past 413 — with Content-Length and chunked.
  const std::string pad_ok(4096 - 2, ' '), pad_over(4096 - 1, ' ');
  CHECK(request(s.port, "POST", "/v1/completions", "{" + pad_ok + "}").status == 400);
  CHECK(request(s.port, "POST", "/v1/completions", "{" + pad_over + "}").status == 413);
  {
    int fd = connect_to(s.port);
    std::string chunked = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 5; ++i) chunked += "400\r\n" + std::string(1024, ' ') + "\r\n";
    chunked += "0\r\n\r\n";
    send_all(fd, chunked);
    CHECK(parse(read_all(fd)).status == 413);
    ::close(fd);
  }
  // Headers: under the limit fine, over 431.
  CHECK(request(s.port, "GET", "/healthz", "", "X-Pad: " + std::string(1500, 'a') + "\r\n").status == 200);
  CHECK(request(s.port, "GET", "/healthz", "", "X-Pad: " + std::string(2100, 'a') + "\r\n").status == 431);
}

TEST_CASE("HTTP API: overload beyond the queue gets 503 with Retry-After while accepted requests complete", "[actors][http]") {
  auto s = serve({}, 2);  // a queue of two
  std::vector<std::future<response>> calls;
  for (int i = 0; i < 16; ++i)
    calls.push_back(std::async(std::launch::async, [&] {
      return request(s.port, "POST", "/v1/completions", json{{"prompt", {1, 2, 3}}, {"max_tokens", 40}, {"ignore_eos", true}}.dump());
    }));
  int ok = 0, refused = 0;
  for (auto& f : calls) {
    auto r = f.get();
    if (r.status == 200) {
      ++ok;
      CHECK(json::parse(r.body)["choices"][0]["token_ids"].size() == 40);
    } else {
      CHECK(r.status == 503);
      CHECK(r.head.find("Retry-After") != std::string::npos);
      ++refused;
    }
  }
  CHECK(ok + refused == 16);
  CHECK(ok >= 2);
}

TEST_CASE("HTTP API: slow-header clients are cut at the header timeout while normal requests work, connection limit", "[actors][http]") {
  api::http_config hc;
  hc.header_timeout = std::chrono::milliseconds(300);
  hc.max_connections = 300;
  auto s = serve(hc);
  // 200 clients that send half a request head and stall.
  std::vector<int> slow;
  for (int i = 0; i < 200; ++i) {
    int fd = connect_to(s.port);
    send_all(fd, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
    slow.push_back(fd);
  }
  // A normal request still works meanwhile.
  CHECK(request(s.port, "POST", "/v1/completions", json{{"prompt", {1, 2}}, {"max_tokens", 2}}.dump()).status == 200);
  // Each slow client gets 408 and is closed.
  int timed_out = 0;
  for (int fd : slow) {
    auto r = parse(read_all(fd, 5000));
    timed_out += r.status == 408;
    ::close(fd);
  }
  CHECK(timed_out == 200);
  // Connection limit: beyond it, 503 at once.
  api::http_config small;
  small.max_connections = 3;
  small.idle_timeout = std::chrono::milliseconds(5000);
  small.header_timeout = std::chrono::milliseconds(5000);
  auto s2 = serve(small);
  std::vector<int> held;
  for (int i = 0; i < 3; ++i) held.push_back(connect_to(s2.port));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto over = request(s2.port, "GET", "/healthz");
  CHECK(over.status == 503);
  for (int fd : held) ::close(fd);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(request(s2.port, "GET", "/healthz").status == 200);
}

TEST_CASE("HTTP API: a client that disconnects cancels its sequences", "[actors][http]") {
  auto s = serve();
  for (bool stream : {false, true}) {
    INFO("stream " << stream);
    int fd = connect_to(s.port);
    const std::string body = json{{"prompt", {1, 2, 3}}, {"max_tokens", 200}, {"n", 2}, {"stream", stream}, {"ignore_eos", true}}.dump();
    send_all(fd, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
    const auto t0 = std::chrono::steady_clock::now();
    while (s.cluster->running() < 2 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10))
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    REQUIRE(s.cluster->running() == 2);
    ::close(fd);
    // The sequences leave well before their 200 tokens, and the request is no longer counted.
    while ((s.cluster->running() > 0 || s.server->active_requests() > 0) &&
           std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10))
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    CHECK(s.cluster->running() == 0);
    CHECK(s.server->active_requests() == 0);
  }
}

TEST_CASE("HTTP API: draining refuses new requests and finishes the running streams", "[actors][http]") {
  auto s = serve();
  const std::string body = json{{"prompt", {1, 2, 3}}, {"max_tokens", 200}, {"stream", true}, {"ignore_eos", true}}.dump();
  std::vector<std::future<std::string>> streams;
  for (int i = 0; i < 4; ++i)
    streams.push_back(std::async(std::launch::async, [&] {
      int fd = connect_to(s.port);
      send_all(fd, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
      auto raw = read_all(fd);
      ::close(fd);
      return raw;
    }));
  const auto start = std::chrono::steady_clock::now();
  while (s.cluster->running() < 4 && std::chrono::steady_clock::now() - start < std::chrono::seconds(30))
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  REQUIRE(s.cluster->running() == 4);  // all four streams run when the drain starts
  s.server->drain();
  s.cluster->drain();
  auto ready = request(s.port, "GET", "/readyz");
  CHECK(ready.status == 503);
  auto refused = request(s.port, "POST", "/v1/completions", json{{"prompt", {1}}}.dump());
  CHECK(refused.status == 503);
  CHECK(refused.head.find("Retry-After") != std::string::npos);
  for (auto& f : streams) {
    auto r = parse(f.get());
    REQUIRE(r.status == 200);
    auto events = sse_events(r.body);
    REQUIRE_FALSE(events.empty());
    CHECK(events.back() == "[DONE]");
    size_t tokens = 0;
    for (size_t i = 0; i + 2 < events.size(); ++i) tokens += json::parse(events[i])["choices"][0]["token_ids"].size();
    CHECK(tokens == 200);
  }
  const auto t0 = std::chrono::steady_clock::now();
  while (!(s.cluster->idle() && s.server->active_requests() == 0) && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(s.cluster->idle());
  CHECK(s.server->active_requests() == 0);
}
