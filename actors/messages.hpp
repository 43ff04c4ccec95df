#pragma once
/// Control-plane messages between the coordinator, routers and expert hosts (CAF). Plain structs
/// with `inspect` overloads, so they can cross processes once registered with the actor system.
#include "actors/placement.hpp"

#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>

namespace sy::actors {

using register_atom = caf::atom_constant<caf::atom("register")>;
using assign_atom = caf::atom_constant<caf::atom("assign")>;
using ready_atom = caf::atom_constant<caf::atom("ready")>;
using subscribe_atom = caf::atom_constant<caf::atom("subscribe")>;
using placement_atom = caf::atom_constant<caf::atom("placement")>;
using heartbeat_atom = caf::atom_constant<caf::atom("heartbeat")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using freeze_atom = caf::atom_constant<caf::atom("freeze")>;
using load_atom = caf::atom_constant<caf::atom("load")>;             ///< router → coordinator: tokens per expert
using rebalance_atom = caf::atom_constant<caf::atom("rebalance")>;   ///< → coordinator: plan and apply now
using add_atom = caf::atom_constant<caf::atom("addexp")>;           ///< coordinator → host: load these replicas
using remove_atom = caf::atom_constant<caf::atom("rmexp")>;         ///< coordinator → host: drop these replicas
using epoch_ack_atom = caf::atom_constant<caf::atom("epochack")>;   ///< router → coordinator: drained up to epoch
using drain_check_atom = caf::atom_constant<caf::atom("draincheck")>;
using load_tick_atom = caf::atom_constant<caf::atom("loadtick")>;
using rebalance_tick_atom = caf::atom_constant<caf::atom("rbtick")>;
using ack_timeout_atom = caf::atom_constant<caf::atom("acktimeout")>;
using replace_lost_atom = caf::atom_constant<caf::atom("replost")>;
using recovery_timeout_atom = caf::atom_constant<caf::atom("recovered")>;

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, replica& x) {
  return f(caf::meta::type_name("replica"), x.host, x.slot, x.version, x.share, x.ready);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, host_info& x) {
  return f(caf::meta::type_name("host_info"), x.id, x.name, x.data_address, x.slots, x.up);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, placement_table& x) {
  return f(caf::meta::type_name("placement_table"), x.epoch, x.layers, x.experts, x.table, x.moe_layer);
}

}  // namespace sy::actors
