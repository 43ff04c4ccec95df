#include "actors/cluster_actors.hpp"

#include "actors/messages.hpp"
#include "model/error.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

namespace sy::actors {

/// Keeps the cluster's state: hosts, the placement table and its epoch. Plans once the expected
/// hosts have registered, marks replicas ready as hosts load them, and pushes every new epoch to
/// the routers. A host that goes down (its actor terminates) is marked down under a new epoch.
caf::behavior coordinator_actor(caf::stateful_actor<coordinator_state>* self, model::model_config cfg, int expected,
                                int replicas, heartbeat_config heartbeat) {
  self->state.cfg = std::move(cfg);
  self->state.heartbeat = heartbeat;
  self->state.expected = expected;
  self->state.replicas = replicas;
  auto broadcast = [self] {
    for (auto& s : self->state.subscribers) self->send(s, placement_atom::value, self->state.placement, self->state.hosts);
  };
  auto mark_down = [self, broadcast](size_t i, const char* why) {
    auto& st = self->state;
    if (!st.hosts[i].up) return;
    st.hosts[i].up = false;
    ++st.placement.epoch;
    spdlog::warn("coordinator: host {} is down ({}); placement epoch {}", st.hosts[i].name, why, st.placement.epoch);
    broadcast();
  };
  self->set_down_handler([self, mark_down](caf::down_msg& dm) {
    auto& st = self->state;
    for (size_t i = 0; i < st.host_actors.size(); ++i)
      if (st.host_actors[i].address() == dm.source) mark_down(i, "its actor or process is gone");
  });
  if (heartbeat.interval.count() > 0) self->delayed_send(self, heartbeat.interval, tick_atom::value);
  return {
      [self](register_atom, const std::string& name, const std::string& address, int slots) -> int {
        auto& st = self->state;
        const int id = static_cast<int>(st.hosts.size());
        st.hosts.push_back({id, name, address, slots, true});
        st.host_actors.push_back(caf::actor_cast<caf::actor>(self->current_sender()));
        st.missed.push_back(0);
        self->monitor(st.host_actors.back());
        if (static_cast<int>(st.hosts.size()) == st.expected) {
          auto p = plan_initial(st.cfg, st.hosts, st.replicas);
          if (!p) {
            spdlog::error("coordinator: cannot place the experts: {}", model::describe(p.error()));
          } else {
            st.placement = std::move(*p);
            st.planned = true;
            spdlog::info("coordinator: placed {} layers x {} experts x {} replicas on {} hosts", st.placement.layers,
                         st.placement.experts, st.replicas, st.hosts.size());
            for (size_t h = 0; h < st.host_actors.size(); ++h)
              self->send(st.host_actors[h], assign_atom::value, static_cast<int>(h), st.placement);
          }
        }
        return id;
      },
      [self, broadcast](ready_atom, int host) {
        auto& st = self->state;
        for (auto& layer : st.placement.table)
          for (auto& rs : layer)
            for (auto& r : rs)
              if (r.host == host) r.ready = true;
        ++st.placement.epoch;
        spdlog::info("coordinator: host {} ready; placement epoch {}", host, st.placement.epoch);
        broadcast();
      },
      [self, mark_down](tick_atom) {
        auto& st = self->state;
        for (size_t i = 0; i < st.host_actors.size(); ++i) {
          if (!st.hosts[i].up) continue;
          self->request(st.host_actors[i], st.heartbeat.interval, heartbeat_atom::value)
              .then([self, i](heartbeat_atom) { self->state.missed[i] = 0; },
                    [self, i, mark_down](caf::error&) {
                      if (++self->state.missed[i] >= self->state.heartbeat.misses) mark_down(i, "missed heartbeats");
                    });
        }
        self->delayed_send(self, st.heartbeat.interval, tick_atom::value);
      },
      [self](subscribe_atom) {
        auto s = caf::actor_cast<caf::actor>(self->current_sender());
        self->state.subscribers.push_back(s);
        if (self->state.planned) self->send(s, placement_atom::value, self->state.placement, self->state.hosts);
      },
  };
}

/// Registers with the coordinator, loads the experts it is assigned, reports ready.
caf::behavior host_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<expert_host_core> core,
                         std::string data_address, std::shared_ptr<const model::model_config> cfg,
                         std::shared_ptr<const model::checkpoint> ckpt) {
  self->send(coordinator, register_atom::value, core->name(), data_address, core->slots());
  return {
      [=](heartbeat_atom) { return heartbeat_atom::value; },
      [=](freeze_atom) {
        // Simulated hang (tests): stop answering anything, as a stuck process would.
        self->become([](heartbeat_atom) {});
      },
      [=](int) {},  // the coordinator's answer to register: the id also comes with the assignment
      [=](assign_atom, int id, const placement_table& p) {
        auto experts = p.assigned_to(id);
        if (auto err = core->load(*cfg, *ckpt, experts)) {
          spdlog::error("{}: loading {} experts failed: {}", core->name(), experts.size(), model::describe(err));
          return;
        }
        spdlog::info("{}: holds {} experts", core->name(), experts.size());
        self->send(coordinator, ready_atom::value, id);
      },
  };
}

/// Follows the coordinator's placement epochs for the router's executor.
caf::behavior router_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<cluster_executor> exec) {
  self->send(coordinator, subscribe_atom::value);
  return {
      [=](placement_atom, placement_table p, std::vector<host_info> hosts) { exec->update(std::move(p), std::move(hosts)); },
  };
}

void register_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<replica>("sy::replica");
  cfg.add_message_type<host_info>("sy::host_info");
  cfg.add_message_type<std::vector<host_info>>("sy::host_info_list");
  cfg.add_message_type<placement_table>("sy::placement_table");
}

}  // namespace sy::actors
