// The coordinator actor on its own, driven by test actors standing in for hosts and a router: its
// recovery from a state file, step by step, in an order the multi-process test only hits by chance.
#include "actors/cluster_actors.hpp"
#include "actors/messages.hpp"
#include "model/config.hpp"
#include "tests/actors/reference.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <unistd.h>

using namespace sy;

namespace {

using namespace std::chrono_literals;

/// A test actor that registers as an expert host and takes its assignment.
struct fake_host {
  caf::scoped_actor self;
  int id = -1;
  actors::placement_table assigned;

  fake_host(caf::actor_system& sys, const caf::actor& coordinator, const std::string& name) : self(sys) {
    self->request(coordinator, 10s, actors::register_atom::value, name, std::string("inproc://") + name, 64)
        .receive([&](int i) { id = i; }, [](caf::error& e) { FAIL("register: " << to_string(e)); });
  }
  /// The assignment: at once for a known host, once every expected host is there for a new one.
  void take_assignment() {
    self->receive([&](actors::assign_atom, int i, const actors::placement_table& p) {
                    CHECK(i == id);
                    assigned = p;
                  },
                  caf::after(10s) >> [] { FAIL("no assignment"); });
  }
  void ready(const caf::actor& coordinator) { self->send(coordinator, actors::ready_atom::value, id); }
  /// Nothing more was asked of this host (no replicas to add, nothing to drop).
  bool idle() {
    bool got = false;
    self->receive([&](caf::message&) { got = true; }, caf::after(0ms) >> [] {});
    return !got;
  }
};

}  // namespace

TEST_CASE("coordinator: recovery ends only once every recovered host is back and ready, re-placing nothing", "[actors]") {
  auto mc = model::load_config(test::fixture("mixtral_e8k2"));
  REQUIRE(mc);
  const std::string state =
      (std::filesystem::temp_directory_path() / ("sy-coord-recovery-" + std::to_string(::getpid()) + ".json")).string();
  std::filesystem::remove(state);
  caf::actor_system_config cfg;
  actors::register_message_types(cfg);
  caf::actor_system sys{cfg};
  const actors::heartbeat_config no_heartbeat{0ms, 3};
  const std::vector<std::string> names{"h0", "h1", "h2"};

  // A first coordinator places the experts over three hosts and writes the state file.
  actors::placement_table first;
  {
    auto c = sys.spawn(actors::coordinator_actor, *mc, 3, 1, no_heartbeat, actors::rebalance_config{}, state, 30s);
    std::vector<std::unique_ptr<fake_host>> hosts;
    for (const auto& n : names) hosts.push_back(std::make_unique<fake_host>(sys, c, n));
    for (auto& h : hosts) h->take_assignment();
    for (auto& h : hosts) h->ready(c);
    caf::scoped_actor router{sys};
    router->send(c, actors::subscribe_atom::value);
    router->receive([&](actors::placement_atom, const actors::placement_table& p, const std::vector<actors::host_info>&) { first = p; },
                    caf::after(10s) >> [] { FAIL("no placement"); });
    // Ready messages may still be queued behind the subscription: wait for the last epoch.
    while (!first.all_ready())
      router->receive([&](actors::placement_atom, const actors::placement_table& p, const std::vector<actors::host_info>&) { first = p; },
                      caf::after(10s) >> [] { FAIL("the placement never became ready"); });
    caf::scoped_actor waiter{sys};
    waiter->monitor(c);
    caf::anon_send_exit(c, caf::exit_reason::kill);
    waiter->receive([](const caf::down_msg&) {});
  }
  REQUIRE(std::filesystem::exists(state));

  // The restarted coordinator: every host registers again, but only one has reported ready.
  auto c = sys.spawn(actors::coordinator_actor, *mc, 3, 1, no_heartbeat, actors::rebalance_config{}, state, 30s);
  std::vector<std::unique_ptr<fake_host>> hosts;
  for (const auto& n : names) {
    hosts.push_back(std::make_unique<fake_host>(sys, c, n));
    hosts.back()->take_assignment();  // a recovered host is told its old replicas at once
  }
  for (size_t h = 0; h < hosts.size(); ++h) {
    CHECK(hosts[h]->id == static_cast<int>(h));  // the same ids as before
    CHECK(hosts[h]->assigned.assigned_to(hosts[h]->id) == first.assigned_to(static_cast<int>(h)));
  }
  caf::scoped_actor router{sys};
  router->send(c, actors::subscribe_atom::value);
  hosts[0]->ready(c);
  // Still recovering: nothing is published, and a round is refused rather than re-placing the
  // experts of the two hosts that are up but not yet ready. (This request is queued behind the
  // ready message, so it is answered after it was handled.)
  std::string answer;
  router->request(c, 10s, actors::rebalance_atom::value)
      .receive([&](const std::string& s) { answer = s; }, [&](caf::error& e) { answer = "error: " + to_string(e); });
  CHECK(answer.find("not placed yet") != std::string::npos);
  bool published = false;
  router->receive([&](actors::placement_atom, const actors::placement_table&, const std::vector<actors::host_info>&) { published = true; },
                  caf::after(0ms) >> [] {});
  CHECK_FALSE(published);

  hosts[1]->ready(c);
  hosts[2]->ready(c);
  actors::placement_table after;
  router->receive([&](actors::placement_atom, const actors::placement_table& p, const std::vector<actors::host_info>& hs) {
                    after = p;
                    CHECK(hs.size() == 3);
                    for (const auto& h : hs) CHECK(h.up);
                  },
                  caf::after(10s) >> [] { FAIL("the recovered placement was not published"); });
  CHECK(after.epoch > first.epoch);
  CHECK(after.all_ready());
  REQUIRE(after.table.size() == first.table.size());
  for (size_t l = 0; l < first.table.size(); ++l)
    for (size_t e = 0; e < first.table[l].size(); ++e) {
      REQUIRE(after.table[l][e].size() == first.table[l][e].size());
      for (size_t r = 0; r < first.table[l][e].size(); ++r) {
        CHECK(after.table[l][e][r].host == first.table[l][e][r].host);
        CHECK(after.table[l][e][r].slot == first.table[l][e][r].slot);
      }
    }
  for (auto& h : hosts) CHECK(h->idle());  // no replica added or dropped anywhere
  caf::anon_send_exit(c, caf::exit_reason::kill);
  std::filesystem::remove(state);
}
