#include "test_util.hpp"

#include "model/error.hpp"
#include "transport/inproc_link.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <condition_variable>
#include <latch>
#include <mutex>
#include <thread>

using namespace sy::transport;
using namespace std::chrono_literals;

TEST_CASE("inproc: round trips in bf16 and f32, on a worker pool and on the caller's thread", "[transport][inproc]") {
  for (unsigned workers : {0u, 2u}) {
    INFO("workers " << workers);
    auto server = inproc_server::make([](request r) -> caf::expected<reply> { return test::negate(std::move(r)); },
                                      {workers, {}});
    REQUIRE(server);
    auto link = (*server)->connect();
    CHECK((*server)->connections() == 1);
    uint64_t id = 1;
    for (auto dtype : {wire_dtype::bf16, wire_dtype::f32}) {
      for (std::vector<uint32_t> rows : {std::vector<uint32_t>{1}, {3, 1, 7}, {64}}) {
        auto req = test::make_request(id, rows, 128, dtype, static_cast<uint32_t>(id));
        ++id;
        auto copy = test::clone(req);
        const auto* rows_before = req.rows.data();
        auto rep = link->call(std::move(req), 5s).get();
        REQUIRE(rep);
        CHECK(test::is_negation_of(copy, *rep));
        CHECK(rep->rows.data() == rows_before);  // moved end to end: the rows were never copied
      }
    }
    auto s = link->stats();
    CHECK(s.requests_sent == 6);
    CHECK(s.replies_received == 6);
    CHECK(s.bytes_sent == s.bytes_received);
    CHECK(s.errors_total() == 0);
    CHECK((*server)->stats().requests_received == 6);
    CHECK((*server)->stats().replies_sent == 6);
  }
}

TEST_CASE("inproc: a handler's error reaches the caller unchanged, whatever its layer", "[transport][inproc]") {
  slot_inventory inv;
  inv.add({100, 3, 0, 1, 64});
  auto server = inproc_server::make([&](request r) -> caf::expected<reply> {
    if (auto err = inv.check(r.header)) return err;
    if (r.header.batch_id == 13) return sy::model::make_error(sy::model::model_errc::bad_value, "model: NaN rows");
    return test::negate(std::move(r));
  });
  REQUIRE(server);
  auto link = (*server)->connect();
  CHECK(link->call(test::make_request(1, {2}), 5s).get());
  auto unknown = link->call(test::make_request(2, {2, 2}), 5s).get();  // expert 1 is not held
  REQUIRE_FALSE(unknown);
  CHECK(wire_code(unknown.error()) == wire_errc::unknown_expert);
  auto model_err = link->call(test::make_request(13, {1}), 5s).get();
  REQUIRE_FALSE(model_err);
  CHECK(model_err.error().category() == caf::atom("model"));
  CHECK(describe(model_err.error()) == "model: NaN rows");
  CHECK(link->stats().errors_received == 2);
  CHECK(link->stats().error_count(wire_errc::unknown_expert) == 1);
}

TEST_CASE("inproc: invalid requests, bad replies, duplicates and timeouts fail with typed errors", "[transport][inproc]") {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  auto server = inproc_server::make([&](request r) -> caf::expected<reply> {
    if (r.header.layer == test::blocking_layer) {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return release; });
    }
    if (r.header.batch_id == 66) {  // a buggy handler: drops a segment
      auto rep = test::negate(std::move(r));
      rep.header.segments.pop_back();
      return rep;
    }
    return test::negate(std::move(r));
  });
  REQUIRE(server);
  auto link = (*server)->connect();

  auto bad = test::make_request(1, {2});
  bad.header.segments[0].rows = 3;  // the header no longer matches the rows
  auto r = link->call(std::move(bad), 1s).get();
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::length_mismatch);

  auto wrong = link->call(test::make_request(66, {1, 1}), 1s).get();
  REQUIRE_FALSE(wrong);
  CHECK(wire_code(wrong.error()) == wire_errc::handler_failed);

  auto slow = test::make_request(7, {1});
  slow.header.layer = test::blocking_layer;
  auto slow_future = link->call(std::move(slow), 100ms);
  auto dup = link->call(test::make_request(7, {1}), 1s).get();
  REQUIRE_FALSE(dup);
  CHECK(wire_code(dup.error()) == wire_errc::duplicate_batch);
  auto timed_out = slow_future.get();
  REQUIRE_FALSE(timed_out);
  CHECK(wire_code(timed_out.error()) == wire_errc::timeout);
  {
    std::lock_guard lock(mu);
    release = true;
  }
  cv.notify_all();
  // The handler finishes after the timeout: the late reply is counted, not delivered. The next
  // request runs on the same single worker after it, so its reply proves the late one happened.
  CHECK(link->call(test::make_request(8, {1}), 5s).get());
  CHECK(link->stats().late_replies == 1);
  CHECK(link->stats().error_count(wire_errc::timeout) == 1);
}

TEST_CASE("inproc: closing a link or stopping the server fails pending requests with link_closed", "[transport][inproc]") {
  std::latch entered(1);
  std::atomic<bool> entered_once{false};  // a latch must not count below zero
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  auto server = inproc_server::make([&](request r) -> caf::expected<reply> {
    if (r.header.layer == test::blocking_layer) {
      if (!entered_once.exchange(true)) entered.count_down();
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return release; });
    }
    return test::negate(std::move(r));
  });
  REQUIRE(server);
  auto link = (*server)->connect();
  auto blocked = test::make_request(1, {1});
  blocked.header.layer = test::blocking_layer;
  auto first = link->call(std::move(blocked), 10s);
  entered.wait();
  auto queued = link->call(test::make_request(2, {1}), 10s);  // waits behind the blocked one
  link->close();
  CHECK_FALSE(link->is_open());
  for (auto* f : {&first, &queued}) {
    auto r = f->get();
    REQUIRE_FALSE(r);
    CHECK(wire_code(r.error()) == wire_errc::link_closed);
  }
  auto after = link->call(test::make_request(3, {1}), 1s).get();
  REQUIRE_FALSE(after);
  CHECK(wire_code(after.error()) == wire_errc::link_closed);

  auto link2 = (*server)->connect();
  auto queued2 = link2->call(test::make_request(4, {1}), 10s);  // behind the still-blocked handler
  std::thread stopper([&] { (*server)->stop(); });
  auto r = queued2.get();  // the queued task is dropped by stop() and fails at once
  REQUIRE_FALSE(r);
  CHECK(wire_code(r.error()) == wire_errc::link_closed);
  {
    std::lock_guard lock(mu);
    release = true;
  }
  cv.notify_all();
  stopper.join();
  CHECK((*server)->connections() == 0);
  CHECK_FALSE(link2->is_open());
}
