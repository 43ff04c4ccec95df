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
#include <optional>
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

/// Live rebalancing (DESIGN.md §5): routers report the tokens each expert receives every
/// `report_interval`; the coordinator smooths them (exponential moving average per report) and,
/// every `interval` (0 = only on demand) or when asked, plans from the current placement with the
/// planner (scheduler/planner.hpp), loads the new replicas, publishes the new epoch, waits until
/// every router has drained the old one, then unloads the replicas no longer needed.
struct rebalance_config {
  std::chrono::milliseconds interval{0};
  std::chrono::milliseconds report_interval{500};
  double smoothing = 0.3;     ///< weight of the newest report in the moving average
  int64_t max_moves = -1;     ///< replicas added per round (-1 = no limit)
  double min_gain = 0.01;     ///< skip a round that raises balancedness by less
  std::chrono::milliseconds load_timeout{120000};  ///< hosts loading new replicas
  std::chrono::milliseconds ack_timeout{10000};    ///< routers leaving the old epoch
};

/// A rebalance under way.
struct rebalance_job {
  placement_table target;
  std::vector<std::vector<int>> added, removed;  ///< per host, flattened (layer, expert) pairs
  int loads_pending = 0;
  bool failed = false;
  uint64_t epoch = 0;                  ///< published epoch the routers must drain to
  std::vector<caf::actor_addr> waiting;  ///< routers that have not acknowledged it yet
  std::vector<caf::response_promise> promises;
  std::string summary;                 ///< JSON: before/after balancedness, moves, epoch
  std::chrono::steady_clock::time_point started;
};

struct coordinator_state {
  model::model_config cfg;
  heartbeat_config heartbeat;
  std::vector<int> missed;  ///< consecutive heartbeats missed, per host
  std::vector<bool> gone;   ///< the host's actor or process has terminated (never comes back)
  int expected = 0;
  int replicas = 1;
  std::vector<host_info> hosts;
  std::vector<caf::actor> host_actors;
  placement_table placement;
  bool planned = false;
  std::vector<caf::actor> subscribers;
  rebalance_config rebalance;
  std::vector<std::vector<double>> window;  ///< tokens reported since the last average, [layer][expert]
  std::vector<std::vector<double>> smoothed;
  bool have_load = false;
  std::optional<rebalance_job> job;
  uint64_t rebalances = 0, moves = 0;
  /// Persistence: every new epoch is written here (hosts and placement); a coordinator started
  /// with an existing file recovers from it (see coordinator_actor).
  std::string state_file;
  bool recovering = false;  ///< waiting for the recovered hosts to register again
  static inline const char* name = "coordinator";
};

/// Keeps the cluster's state: hosts, the placement table and its epoch. Plans once `expected`
/// hosts have registered, marks replicas ready as hosts load them, and pushes every new epoch to
/// the routers. A host that goes down (its actor terminates, or its process's connection drops) is
/// marked down under a new epoch.
///
/// It also runs live rebalancing (see rebalance_config); `rebalance_atom` asks for a round now and
/// is answered with a JSON summary once it is over (or skipped).
///
/// With a `state_file`, every epoch is persisted (atomically: written beside, then renamed). A
/// coordinator that starts with an existing file recovers the placement and its epoch from it:
/// hosts that register again under the same name get their old replicas back (they still hold
/// them, so nothing is reloaded), and the recovered placement is published under a newer epoch
/// once all of them are back — or after `recovery_wait`, with the missing ones down and their
/// experts re-placed. Routers keep serving on their last placement meanwhile.
caf::behavior coordinator_actor(caf::stateful_actor<coordinator_state>* self, model::model_config cfg, int expected,
                                int replicas, heartbeat_config heartbeat, rebalance_config rebalance, std::string state_file,
                                std::chrono::milliseconds recovery_wait);

/// Registers with the coordinator (name, data address, slots), loads the experts it is assigned,
/// reports ready, and answers heartbeats (until sent `freeze_atom`, which simulates a hang). It
/// ends when the coordinator is gone (its process reconnects and starts a new one).
caf::behavior host_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<expert_host_core> core,
                         std::string data_address, std::shared_ptr<const model::model_config> cfg,
                         std::shared_ptr<const model::checkpoint> ckpt);

/// Follows the coordinator's placement epochs for a router's executor, acknowledges each once the
/// router has no step left on an older one, and reports the tokens per expert every
/// `report_interval`. It ends when the coordinator is gone (the executor keeps its last placement;
/// the router process reconnects and starts a new one).
caf::behavior router_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<cluster_executor> exec,
                           std::chrono::milliseconds report_interval);

/// Registers the control-plane message types, so they can cross processes.
void register_message_types(caf::actor_system_config& cfg);

}  // namespace sy::actors
