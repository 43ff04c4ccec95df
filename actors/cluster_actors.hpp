#pragma once
/// The cluster's actors (CAF): the same behaviours run in the embedded cluster and in the
/// coordinator, expert-host and router processes.
#include "actors/cluster_executor.hpp"
#include "actors/expert_host.hpp"
#include "actors/placement.hpp"

#include <caf/actor.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/behavior.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace sy::actors {

/// The coordinator's own failure detector: every `interval` each host is asked for a heartbeat; a
/// host that misses `misses` in a row (hung, or cut off) is marked down. CAF's and UCX's keepalives
/// take tens of seconds; a crash is seen sooner through the lost connection.
struct heartbeat_config {
  std::chrono::milliseconds interval{500};
  int misses = 3;
};

struct coordinator_state {
  model::model_config cfg;
  heartbeat_config heartbeat;
  std::vector<int> missed;  ///< consecutive heartbeats missed, per host
  int expected = 0;
  int replicas = 1;
  std::vector<host_info> hosts;
  std::vector<caf::actor> host_actors;
  placement_table placement;
  bool planned = false;
  std::vector<caf::actor> subscribers;
  static inline const char* name = "coordinator";
};

/// Keeps the cluster's state: hosts, the placement table and its epoch. Plans once `expected`
/// hosts have registered, marks replicas ready as hosts load them, and pushes every new epoch to
/// the routers. A host that goes down (its actor terminates, or its process's connection drops) is
/// marked down under a new epoch.
caf::behavior coordinator_actor(caf::stateful_actor<coordinator_state>* self, model::model_config cfg, int expected,
                                int replicas, heartbeat_config heartbeat);

/// Registers with the coordinator (name, data address, slots), loads the experts it is assigned,
/// reports ready, and answers heartbeats (until sent `freeze_atom`, which simulates a hang).
caf::behavior host_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<expert_host_core> core,
                         std::string data_address, std::shared_ptr<const model::model_config> cfg,
                         std::shared_ptr<const model::checkpoint> ckpt);

/// Follows the coordinator's placement epochs for a router's executor.
caf::behavior router_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<cluster_executor> exec);

/// Registers the control-plane message types, so they can cross processes.
void register_message_types(caf::actor_system_config& cfg);

}  // namespace sy::actors
