#include "actors/cluster_actors.hpp"

#include "actors/messages.hpp"
#include "actors/observe.hpp"
#include "model/error.hpp"
#include "scheduler/planner.hpp"

#include <caf/all.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <set>
#include <sstream>
#include <fstream>
#include <filesystem>

namespace sy::actors {
namespace {

using coordinator_ptr = caf::stateful_actor<coordinator_state>*;

std::vector<std::pair<int, int>> unflatten(const std::vector<int>& flat) {
  std::vector<std::pair<int, int>> out;
  for (size_t i = 0; i + 1 < flat.size(); i += 2) out.emplace_back(flat[i], flat[i + 1]);
  return out;
}

/// Writes hosts and placement to the state file (beside it, then renamed: never half a file).
void persist(coordinator_ptr self) {
  auto& st = self->state;
  if (st.state_file.empty()) return;
  nlohmann::json j;
  j["format"] = "switchyard-coordinator-state/1";
  j["epoch"] = st.placement.epoch;
  j["layers"] = st.placement.layers;
  j["experts"] = st.placement.experts;
  auto hosts = nlohmann::json::array();
  for (const auto& h : st.hosts) hosts.push_back({{"name", h.name}, {"address", h.data_address}, {"slots", h.slots}});
  j["hosts"] = std::move(hosts);
  auto table = nlohmann::json::array();
  for (const auto& layer : st.placement.table) {
    auto experts = nlohmann::json::array();
    for (const auto& rs : layer) {
      auto reps = nlohmann::json::array();
      for (const auto& r : rs) reps.push_back({r.host, r.slot, r.version, r.share});
      experts.push_back(std::move(reps));
    }
    table.push_back(std::move(experts));
  }
  j["table"] = std::move(table);
  const std::string tmp = st.state_file + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << j.dump();
    if (!out.flush()) {
      spdlog::error("coordinator: cannot write the state file {}", tmp);
      return;
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, st.state_file, ec);
  if (ec) spdlog::error("coordinator: cannot replace the state file {}: {}", st.state_file, ec.message());
}

/// Reads a state file into the coordinator's state: hosts (down until they register again) and
/// the placement with its epoch. False (and a log line naming the file and the problem) when it
/// cannot be used; the coordinator then starts fresh.
bool recover(coordinator_ptr self) {
  auto& st = self->state;
  std::ifstream in(st.state_file, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  auto bad = [&](const std::string& why) {
    spdlog::error("coordinator: state file {}: {}; starting without it", st.state_file, why);
    return false;
  };
  if (j.is_discarded() || !j.is_object()) return bad("not JSON");
  if (j.value("format", "") != "switchyard-coordinator-state/1") return bad("unknown format");
  if (j.value("layers", -1) != st.cfg.num_layers || j.value("experts", -1) != st.cfg.gating.num_experts)
    return bad("written for another model (layers/experts differ)");
  if (!j.contains("hosts") || !j["hosts"].is_array() || !j.contains("table") || !j["table"].is_array() ||
      j["table"].size() != static_cast<size_t>(st.cfg.num_layers))
    return bad("missing or malformed hosts/table");
  placement_table p;
  p.epoch = j.value("epoch", uint64_t{0});
  p.layers = st.cfg.num_layers;
  p.experts = st.cfg.gating.num_experts;
  p.moe_layer = st.cfg.moe_layer;
  const int nhosts = static_cast<int>(j["hosts"].size());
  for (const auto& layer : j["table"]) {
    std::vector<std::vector<replica>> row;
    if (!layer.is_array()) return bad("malformed table");
    for (const auto& rs : layer) {
      std::vector<replica> reps;
      for (const auto& r : rs) {
        if (!r.is_array() || r.size() != 4) return bad("malformed replica");
        replica x{r[0].get<int>(), r[1].get<int>(), r[2].get<uint32_t>(), r[3].get<double>(), false};
        if (x.host < 0 || x.host >= nhosts) return bad("a replica names an unknown host");
        reps.push_back(x);
      }
      row.push_back(std::move(reps));
    }
    p.table.push_back(std::move(row));
  }
  st.hosts.clear();
  for (const auto& h : j["hosts"])
    st.hosts.push_back({static_cast<int>(st.hosts.size()), h.value("name", ""), h.value("address", ""), h.value("slots", 0), false});
  st.host_actors.assign(st.hosts.size(), caf::actor{});
  st.missed.assign(st.hosts.size(), 0);
  st.gone.assign(st.hosts.size(), false);
  st.placement = std::move(p);
  st.recovering = true;
  spdlog::warn("coordinator: recovered epoch {} with {} hosts from {}; waiting for them to register again",
               st.placement.epoch, st.hosts.size(), st.state_file);
  return true;
}

void broadcast(coordinator_ptr self) {
  observe(self->state);
  persist(self);
  if (self->state.recovering) return;  // routers keep their last placement until the hosts are back
  for (auto& s : self->state.subscribers) self->send(s, placement_atom::value, self->state.placement, self->state.hosts);
}

/// Recovery is over (every recovered host is back, or the wait ran out): publish.
void end_recovery(coordinator_ptr self, const char* why) {
  auto& st = self->state;
  if (!st.recovering) return;
  st.recovering = false;
  st.planned = true;
  ++st.placement.epoch;
  int back = 0;
  for (const auto& h : st.hosts) back += h.up;
  spdlog::warn("coordinator: recovery done ({}): {} of {} hosts back; placement epoch {}", why, back, st.hosts.size(),
               st.placement.epoch);
  broadcast(self);
  if (!st.placement.complete(st.hosts)) self->send(self, replace_lost_atom::value);
}

void finish_job(coordinator_ptr self, const std::string& summary) {
  auto& st = self->state;
  if (!st.job) return;
  for (auto& rp : st.job->promises) rp.deliver(summary);
  st.job.reset();
  // A host lost while the round ran may have left experts without a replica.
  if (st.planned && !st.placement.complete(st.hosts)) self->send(self, replace_lost_atom::value);
}

/// Every router has left the old epoch: the replicas no longer in the table get nothing more, so
/// their hosts drop them.
void unload_old(coordinator_ptr self) {
  auto& st = self->state;
  auto& job = *st.job;
  size_t n = 0;
  for (size_t h = 0; h < job.removed.size() && h < st.host_actors.size(); ++h)
    if (!job.removed[h].empty() && st.hosts[h].up) {
      self->send(st.host_actors[h], remove_atom::value, job.removed[h]);
      n += job.removed[h].size() / 2;
    }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - job.started).count();
  spdlog::info("coordinator: rebalance done in {:.2f} s: epoch {}, {} replicas unloaded", secs, job.epoch, n);
  finish_job(self, job.summary);
}

/// The new replicas are loaded: route to them under a new epoch.
void publish(coordinator_ptr self) {
  auto& st = self->state;
  auto& job = *st.job;
  const uint64_t epoch = st.placement.epoch + 1;
  // Readiness and host state may have moved on while loading: keep the target's table, mark its
  // replicas ready (their hosts answered), and keep the newest epoch.
  st.placement = job.target;
  st.placement.epoch = epoch;
  job.epoch = epoch;
  job.waiting.clear();
  for (auto& r : st.subscribers) job.waiting.push_back(r.address());
  spdlog::info("coordinator: rebalance published epoch {}; waiting for {} router(s) to drain the old one", epoch,
               job.waiting.size());
  broadcast(self);
  if (job.waiting.empty()) unload_old(self);
  else self->delayed_send(self, st.rebalance.ack_timeout, ack_timeout_atom::value, epoch);
}

void fold_window(coordinator_ptr self) {
  auto& st = self->state;
  if (st.window.empty()) return;
  bool any = false;
  for (auto& row : st.window)
    for (double x : row) any = any || x > 0;
  if (!any) return;
  if (!st.have_load) {
    st.smoothed = st.window;
    st.have_load = true;
  } else {
    const double a = st.rebalance.smoothing;
    for (size_t l = 0; l < st.window.size(); ++l)
      for (size_t e = 0; e < st.window[l].size(); ++e) st.smoothed[l][e] = (1 - a) * st.smoothed[l][e] + a * st.window[l][e];
  }
  for (auto& row : st.window) std::fill(row.begin(), row.end(), 0.0);
}

std::string json_status(const char* status, const std::string& reason) {
  return nlohmann::json{{"status", status}, {"reason", reason}}.dump();
}

/// Plans a round from the smoothed load and the current placement, and starts applying it.
/// `rp` (when given) is answered with the summary at the end.
void start_rebalance(coordinator_ptr self, std::optional<caf::response_promise> rp) {
  auto& st = self->state;
  auto answer = [&](const std::string& s) {
    if (rp) rp->deliver(s);
  };
  if (st.job) {
    if (rp) st.job->promises.push_back(*rp);  // answered when the running round ends
    return;
  }
  if (!st.planned) return answer(json_status("skipped", "the experts are not placed yet"));
  fold_window(self);
  const auto& cfg = st.cfg;
  std::vector<int> up;  // planner GPU g = host up[g]
  for (auto& h : st.hosts)
    if (h.up) up.push_back(h.id);
  std::vector<int> moe;
  for (int l = 0; l < cfg.num_layers; ++l)
    if (cfg.moe_layer[static_cast<size_t>(l)]) moe.push_back(l);
  const int experts = cfg.gating.num_experts;
  if (up.empty() || moe.empty()) return answer(json_status("skipped", "no host is up"));
  int cap = experts;
  for (int h : up) cap = std::min(cap, st.hosts[static_cast<size_t>(h)].slots / static_cast<int>(moe.size()));
  if (cap * static_cast<int>(up.size()) < experts)
    return answer(json_status("failed", "the hosts that are up have " + std::to_string(cap) + " slots per layer each; " +
                                            std::to_string(experts) + " experts need a replica"));
  scheduler::planner_problem prob;
  prob.layers = static_cast<int>(moe.size());
  prob.experts = experts;
  prob.gpus = static_cast<int>(up.size());
  prob.slots = cap * prob.gpus;
  bool observed = st.have_load;
  for (int l : moe) {
    std::vector<double> row(static_cast<size_t>(experts), 1.0);
    if (st.have_load && static_cast<size_t>(l) < st.smoothed.size()) row = st.smoothed[static_cast<size_t>(l)];
    prob.load.push_back(std::move(row));
  }
  // The current placement as a plan over the hosts that are up (shares renormalised over them).
  scheduler::plan prev;
  prev.layers.assign(moe.size(), std::vector<std::vector<scheduler::placed_replica>>(up.size()));
  std::vector<int> gpu_of(st.hosts.size(), -1);
  for (size_t g = 0; g < up.size(); ++g) gpu_of[static_cast<size_t>(up[g])] = static_cast<int>(g);
  for (size_t i = 0; i < moe.size(); ++i)
    for (int e = 0; e < experts; ++e) {
      const auto& rs = st.placement.table[static_cast<size_t>(moe[i])][static_cast<size_t>(e)];
      double total = 0;
      for (const auto& r : rs)
        if (r.ready && gpu_of[static_cast<size_t>(r.host)] >= 0) total += r.share;
      for (const auto& r : rs)
        if (r.ready && gpu_of[static_cast<size_t>(r.host)] >= 0) {
          auto& dst = prev.layers[i][static_cast<size_t>(gpu_of[static_cast<size_t>(r.host)])];
          if (static_cast<int>(dst.size()) < cap) dst.push_back({e, total > 0 ? r.share / total : 1.0});
        }
    }
  // Experts with no replica left on a host that is up (their hosts died): placed provisionally on
  // the survivor with the fewest replicas that has room, so the round plans from what survives.
  int lost = 0;
  for (size_t i = 0; i < moe.size(); ++i)
    for (int e = 0; e < experts; ++e) {
      bool held = false;
      for (const auto& g : prev.layers[i])
        for (const auto& r : g) held = held || r.expert == e;
      if (held) continue;
      ++lost;
      size_t best = prev.layers[i].size();
      for (size_t g = 0; g < prev.layers[i].size(); ++g)
        if (static_cast<int>(prev.layers[i][g].size()) < cap &&
            (best == prev.layers[i].size() || prev.layers[i][g].size() < prev.layers[i][best].size()))
          best = g;
      if (best < prev.layers[i].size()) prev.layers[i][best].push_back({e, 1.0});
    }
  if (lost > 0) spdlog::warn("coordinator: {} expert replicas have no live host; re-placing them on the survivors", lost);
  const bool prev_ok = !scheduler::validate(prob, prev);
  scheduler::planner_options po;
  if (st.rebalance.max_moves >= 0) po.max_moves = st.rebalance.max_moves;
  auto plan = scheduler::plan_placement(prob, prev_ok ? &prev : nullptr, po);
  if (!plan) return answer(json_status("failed", model::describe(plan.error())));
  const double before = prev_ok ? scheduler::balancedness(prob, prev) : 0.0;
  const double after = plan->balancedness;
  const int64_t moves = prev_ok ? scheduler::count_moves(prev, *plan) : -1;
  nlohmann::json summary{{"balancedness_before", before}, {"balancedness_after", after}, {"moves", moves},
                         {"load_observed", observed}, {"hosts", up.size()}, {"slots_per_layer", cap},
                         {"lost_replaced", lost}};
  if (prev_ok && lost == 0 && (after - before < st.rebalance.min_gain || moves == 0)) {
    summary["status"] = "skipped";
    summary["reason"] = moves == 0 ? "the placement is already the plan" : "the gain is below rebalance.min_gain";
    spdlog::info("coordinator: rebalance skipped: balancedness {:.4f} → {:.4f}, {} moves", before, after, moves);
    return answer(summary.dump());
  }
  // The target table: the plan's replicas on their hosts, ready (loaded before it is published).
  rebalance_job job;
  job.started = std::chrono::steady_clock::now();
  job.target = st.placement;
  job.added.assign(st.hosts.size(), {});
  job.removed.assign(st.hosts.size(), {});
  std::vector<int> next_slot(st.hosts.size(), 0);
  for (size_t i = 0; i < moe.size(); ++i) {
    const int l = moe[i];
    std::vector<std::vector<replica>> row(static_cast<size_t>(experts));
    for (size_t g = 0; g < up.size(); ++g)
      for (const auto& r : plan->layers[i][g]) {
        const int h = up[g];
        uint32_t version = 1;
        bool had = false;
        for (const auto& old : st.placement.table[static_cast<size_t>(l)][static_cast<size_t>(r.expert)])
          if (old.host == h && old.ready) had = true, version = old.version;
        row[static_cast<size_t>(r.expert)].push_back({h, next_slot[static_cast<size_t>(h)]++, version, r.share, true});
        if (!had) {
          job.added[static_cast<size_t>(h)].push_back(l);
          job.added[static_cast<size_t>(h)].push_back(r.expert);
        }
      }
    for (int e = 0; e < experts; ++e)
      for (const auto& old : st.placement.table[static_cast<size_t>(l)][static_cast<size_t>(e)]) {
        bool kept = false;
        for (const auto& r : row[static_cast<size_t>(e)]) kept = kept || r.host == old.host;
        if (!kept) {
          job.removed[static_cast<size_t>(old.host)].push_back(l);
          job.removed[static_cast<size_t>(old.host)].push_back(e);
        }
      }
    job.target.table[static_cast<size_t>(l)] = std::move(row);
  }
  summary["status"] = "done";
  job.summary = summary.dump();
  if (rp) job.promises.push_back(*rp);
  int adding = 0, replicas = 0;
  for (auto& a : job.added)
    if (!a.empty()) ++adding, replicas += static_cast<int>(a.size() / 2);
  spdlog::info("coordinator: rebalance: balancedness {:.4f} → {:.4f}; loading {} new replicas on {} hosts", before, after,
               replicas, adding);
  st.job = std::move(job);
  ++st.rebalances;
  st.moves += static_cast<uint64_t>(replicas);
  if (adding == 0) return publish(self);
  st.job->loads_pending = adding;
  for (size_t h = 0; h < st.job->added.size(); ++h) {
    if (st.job->added[h].empty()) continue;
    self->request(st.host_actors[h], st.rebalance.load_timeout, add_atom::value, st.job->added[h])
        .then(
            [self](ready_atom) {
              auto& job = self->state.job;
              if (!job || job->failed) return;
              if (--job->loads_pending == 0) publish(self);
            },
            [self, h](caf::error& err) {
              auto& st = self->state;
              if (!st.job || st.job->failed) return;
              // Nothing was published: the old placement keeps serving. Drop what was loaded.
              st.job->failed = true;
              const std::string why = st.hosts[h].name + " could not load its new replicas: " + model::describe(err);
              spdlog::error("coordinator: rebalance abandoned: {}", why);
              for (size_t k = 0; k < st.job->added.size(); ++k)
                if (k != h && !st.job->added[k].empty() && st.hosts[k].up)
                  self->send(st.host_actors[k], remove_atom::value, st.job->added[k]);
              finish_job(self, json_status("failed", why));
            });
  }
}

}  // namespace

/// Keeps the cluster's state: hosts, the placement table and its epoch. Plans once the expected
/// hosts have registered, marks replicas ready as hosts load them, and pushes every new epoch to
/// the routers. A host that goes down (its actor terminates) is marked down under a new epoch.
caf::behavior coordinator_actor(caf::stateful_actor<coordinator_state>* self, model::model_config cfg, int expected,
                                int replicas, heartbeat_config heartbeat, rebalance_config rebalance, std::string state_file,
                                std::chrono::milliseconds recovery_wait) {
  self->state.rebalance = rebalance;
  self->state.state_file = std::move(state_file);
  self->state.cfg = std::move(cfg);
  self->state.heartbeat = heartbeat;
  self->state.expected = expected;
  self->state.replicas = replicas;
  auto mark_down = [self](size_t i, const char* why) {
    auto& st = self->state;
    if (!st.hosts[i].up) return;
    st.hosts[i].up = false;
    ++st.placement.epoch;
    spdlog::warn("coordinator: host {} is down ({}); placement epoch {}", st.hosts[i].name, why, st.placement.epoch);
    broadcast(self);
    // Experts whose every replica was there are re-placed on the survivors (when they have room).
    if (st.planned && !st.placement.complete(st.hosts)) self->send(self, replace_lost_atom::value);
  };
  self->set_down_handler([self, mark_down](caf::down_msg& dm) {
    auto& st = self->state;
    for (size_t i = 0; i < st.host_actors.size(); ++i)
      if (st.host_actors[i].address() == dm.source) {
        st.gone[i] = true;
        mark_down(i, "its actor or process is gone");
      }
    // A router that is gone has nothing to drain.
    auto& subs = st.subscribers;
    subs.erase(std::remove_if(subs.begin(), subs.end(), [&](const caf::actor& a) { return a.address() == dm.source; }), subs.end());
    if (st.job && st.job->epoch > 0) {
      auto& w = st.job->waiting;
      w.erase(std::remove(w.begin(), w.end(), dm.source), w.end());
      if (w.empty()) unload_old(self);
    }
  });
  if (!self->state.state_file.empty() && recover(self)) {
    self->state.expected = std::max<int>(self->state.expected, static_cast<int>(self->state.hosts.size()));
    self->delayed_send(self, recovery_wait, recovery_timeout_atom::value);
  }
  if (heartbeat.interval.count() > 0) self->delayed_send(self, heartbeat.interval, tick_atom::value);
  if (rebalance.report_interval.count() > 0) self->delayed_send(self, rebalance.report_interval, load_tick_atom::value);
  if (rebalance.interval.count() > 0) self->delayed_send(self, rebalance.interval, rebalance_tick_atom::value);
  return {
      [self](register_atom, const std::string& name, const std::string& address, int slots) -> int {
        auto& st = self->state;
        // A host known from the state file (or one that lost its coordinator and came back):
        // same id, its replicas are still its own.
        for (size_t k = 0; k < st.hosts.size(); ++k) {
          if (st.hosts[k].name != name || (st.host_actors[k] && !st.gone[k])) continue;
          st.hosts[k].data_address = address;
          st.hosts[k].slots = slots;
          st.hosts[k].up = true;
          st.host_actors[k] = caf::actor_cast<caf::actor>(self->current_sender());
          st.missed[k] = 0;
          st.gone[k] = false;
          self->monitor(st.host_actors[k]);
          spdlog::info("coordinator: host {} registered again", name);
          self->send(st.host_actors[k], assign_atom::value, static_cast<int>(k), st.placement);
          return static_cast<int>(k);
        }
        const int id = static_cast<int>(st.hosts.size());
        st.hosts.push_back({id, name, address, slots, true});
        st.host_actors.push_back(caf::actor_cast<caf::actor>(self->current_sender()));
        st.missed.push_back(0);
        st.gone.push_back(false);
        self->monitor(st.host_actors.back());
        if (!st.recovering && !st.planned && static_cast<int>(st.hosts.size()) == st.expected) {
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
      [self](ready_atom, int host) {
        auto& st = self->state;
        for (auto& layer : st.placement.table)
          for (auto& rs : layer)
            for (auto& r : rs)
              if (r.host == host) r.ready = true;
        ++st.placement.epoch;
        spdlog::info("coordinator: host {} ready; placement epoch {}", host, st.placement.epoch);
        broadcast(self);
        // Back means registered and ready: a host that has registered but not yet answered its
        // assignment would count as holding nothing, and ending recovery then would re-place all
        // of its experts elsewhere.
        if (st.recovering && std::all_of(st.hosts.begin(), st.hosts.end(), [](const host_info& h) { return h.up; }) &&
            st.placement.all_ready())
          end_recovery(self, "every host is back");
      },
      [self](recovery_timeout_atom) { end_recovery(self, "the wait ran out"); },
      [self, mark_down](tick_atom) {
        auto& st = self->state;
        // Hosts marked down for missed heartbeats are still asked: one that answers again (it was
        // stalled, or cut off for a while) comes back with the replicas it holds.
        for (size_t i = 0; i < st.host_actors.size(); ++i) {
          if (st.gone[i] || !st.host_actors[i]) continue;
          self->request(st.host_actors[i], st.heartbeat.interval, heartbeat_atom::value)
              .then([self, i](heartbeat_atom) {
                      auto& s = self->state;
                      s.missed[i] = 0;
                      if (!s.hosts[i].up && !s.gone[i]) {
                        s.hosts[i].up = true;
                        ++s.placement.epoch;
                        spdlog::warn("coordinator: host {} answers again; placement epoch {}", s.hosts[i].name, s.placement.epoch);
                        broadcast(self);
                      }
                    },
                    [self, i, mark_down](caf::error&) {
                      if (++self->state.missed[i] >= self->state.heartbeat.misses && self->state.hosts[i].up)
                        mark_down(i, "missed heartbeats");
                    });
        }
        self->delayed_send(self, st.heartbeat.interval, tick_atom::value);
      },
      [self](load_atom, const std::vector<std::vector<double>>& counts) {
        auto& st = self->state;
        if (st.window.size() != counts.size()) st.window.assign(counts.size(), std::vector<double>(counts.empty() ? 0 : counts[0].size(), 0.0));
        for (size_t l = 0; l < counts.size(); ++l)
          for (size_t e = 0; e < counts[l].size() && e < st.window[l].size(); ++e) st.window[l][e] += counts[l][e];
      },
      [self](load_tick_atom) {
        fold_window(self);
        observe(self->state);
        self->delayed_send(self, self->state.rebalance.report_interval, load_tick_atom::value);
      },
      [self](rebalance_tick_atom) {
        start_rebalance(self, std::nullopt);
        self->delayed_send(self, self->state.rebalance.interval, rebalance_tick_atom::value);
      },
      [self](replace_lost_atom) {
        auto& st = self->state;
        if (st.planned && !st.job && !st.placement.complete(st.hosts)) start_rebalance(self, std::nullopt);
      },
      [self](rebalance_atom) -> caf::result<std::string> {
        auto rp = self->make_response_promise<std::string>();
        start_rebalance(self, rp);
        return rp;
      },
      [self](epoch_ack_atom, uint64_t epoch) {
        auto& st = self->state;
        if (!st.job || st.job->epoch == 0 || epoch < st.job->epoch) return;
        auto& w = st.job->waiting;
        w.erase(std::remove(w.begin(), w.end(), self->current_sender()), w.end());
        if (w.empty()) unload_old(self);
      },
      [self](ack_timeout_atom, uint64_t epoch) {
        auto& st = self->state;
        if (!st.job || st.job->epoch != epoch) return;
        spdlog::warn("coordinator: {} router(s) did not leave epoch {} in time; unloading anyway (their batches to "
                     "unloaded replicas are refused and retried on the new ones)",
                     st.job->waiting.size(), epoch - 1);
        unload_old(self);
      },
      [self](subscribe_atom) {
        auto s = caf::actor_cast<caf::actor>(self->current_sender());
        self->monitor(s);
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
  self->monitor(coordinator);
  self->set_down_handler([self, coordinator](caf::down_msg& dm) {
    if (dm.source == coordinator.address()) self->quit(caf::exit_reason::remote_link_unreachable);
  });
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
      [=](add_atom, const std::vector<int>& flat) {
        // Loading takes a while: a worker of its own does it, so this actor keeps answering
        // heartbeats (the coordinator would take a busy host for a hung one). Its answer goes to
        // the coordinator directly.
        auto worker = self->spawn<caf::detached>([core, cfg, ckpt](caf::event_based_actor* w) -> caf::behavior {
          return {[=](add_atom, const std::vector<int>& flat) -> caf::result<ready_atom> {
            w->quit();
            auto experts = unflatten(flat);
            const auto t0 = std::chrono::steady_clock::now();
            if (auto err = core->add(*cfg, *ckpt, experts)) {
              spdlog::error("{}: loading {} new replicas failed: {}", core->name(), experts.size(), model::describe(err));
              return err;
            }
            spdlog::info("{}: loaded {} new replicas in {:.2f} s; holds {}", core->name(), experts.size(),
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), core->held());
            return ready_atom::value;
          }};
        });
        return self->delegate(worker, add_atom::value, flat);
      },
      [=](remove_atom, const std::vector<int>& flat) {
        auto experts = unflatten(flat);
        core->remove(experts);
        spdlog::info("{}: unloaded {} replicas; holds {}", core->name(), experts.size(), core->held());
      },
  };
}

/// Follows the coordinator's placement epochs for the router's executor.
caf::behavior router_actor(caf::event_based_actor* self, caf::actor coordinator, std::shared_ptr<cluster_executor> exec,
                           std::chrono::milliseconds report_interval) {
  self->send(coordinator, subscribe_atom::value);
  self->monitor(coordinator);
  self->set_down_handler([self, coordinator](caf::down_msg& dm) {
    if (dm.source == coordinator.address()) self->quit(caf::exit_reason::remote_link_unreachable);
  });
  if (report_interval.count() > 0) self->delayed_send(self, report_interval, load_tick_atom::value);
  return {
      [=](placement_atom, placement_table p, std::vector<host_info> hosts) {
        const uint64_t epoch = p.epoch;
        if (!exec->update(std::move(p), std::move(hosts))) return;  // refused (logged): not acknowledged
        self->send(self, drain_check_atom::value, epoch);
      },
      [=](drain_check_atom, uint64_t epoch) {
        // Acknowledged once no step pinned to an older epoch is running (steps are short).
        if (exec->drained(epoch)) self->send(coordinator, epoch_ack_atom::value, epoch);
        else self->delayed_send(self, std::chrono::milliseconds(2), drain_check_atom::value, epoch);
      },
      [=](load_tick_atom) {
        auto counts = exec->take_counts();
        bool any = false;
        for (auto& row : counts)
          for (double x : row) any = any || x > 0;
        if (any) self->send(coordinator, load_atom::value, std::move(counts));
        self->delayed_send(self, report_interval, load_tick_atom::value);
      },
  };
}

void register_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<replica>("sy::replica");
  cfg.add_message_type<host_info>("sy::host_info");
  cfg.add_message_type<std::vector<host_info>>("sy::host_info_list");
  cfg.add_message_type<placement_table>("sy::placement_table");
  cfg.add_message_type<std::vector<int>>("sy::int_list");
  cfg.add_message_type<std::vector<double>>("sy::double_list");
  cfg.add_message_type<std::vector<std::vector<double>>>("sy::load_matrix");
}

}  // namespace sy::actors
