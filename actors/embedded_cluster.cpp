#include "actors/embedded_cluster.hpp"

#include "actors/cluster_executor.hpp"
#include "actors/expert_host.hpp"
#include "actors/cluster_actors.hpp"
#include "actors/messages.hpp"
#include "metrics/metrics.hpp"
#include "actors/router_core.hpp"
#include "model/kernels.hpp"
#include "model/weights.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <thread>

namespace sy::actors {

struct embedded_cluster::impl {
  embedded_config cfg;
  std::shared_ptr<const model::model_config> mcfg;
  std::shared_ptr<const model::checkpoint> ckpt;
  std::vector<std::shared_ptr<expert_host_core>> hosts;
  std::unique_ptr<router_core> router_half;
  caf::actor_system_config sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::actor coordinator, router;
  std::vector<caf::actor> host_actors;
  bool down = false;

};

embedded_cluster::embedded_cluster(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

embedded_cluster::~embedded_cluster() { shutdown(); }

caf::expected<std::unique_ptr<embedded_cluster>> embedded_cluster::start(const embedded_config& cfg) {
  if (cfg.hosts < 1) return model::make_error(model::model_errc::invalid_argument, "hosts must be at least 1");
  model::set_kernel_threads(cfg.threads);
  auto p = std::make_unique<impl>();
  p->cfg = cfg;
  auto mc = model::load_config(cfg.model);
  if (!mc) return mc.error();
  p->mcfg = std::make_shared<const model::model_config>(std::move(*mc));
  auto ck = model::checkpoint::open(cfg.model);
  if (!ck) return ck.error();
  p->ckpt = std::make_shared<const model::checkpoint>(std::move(*ck));
  const int64_t needed = static_cast<int64_t>(p->mcfg->num_moe_layers()) * p->mcfg->gating.num_experts * cfg.replicas;
  const int slots = cfg.slots > 0 ? cfg.slots : static_cast<int>((needed * 3 / 2 + cfg.hosts - 1) / cfg.hosts);
  for (int h = 0; h < cfg.hosts; ++h) {
    p->hosts.push_back(std::make_shared<expert_host_core>("expert-host-" + std::to_string(h), slots));
    if (cfg.make_device) {
      auto d = cfg.make_device();
      if (!d) return d.error();
      p->hosts.back()->set_device(std::move(*d));
    }
  }
  // In-process data plane: a host's address names its index here.
  auto connect = [hosts = p->hosts](const host_info& h) -> std::shared_ptr<expert_channel> {
    const std::string prefix = "inproc://";
    if (!h.data_address.starts_with(prefix)) return nullptr;
    const size_t i = std::stoul(h.data_address.substr(prefix.size()));
    return i < hosts.size() ? std::make_shared<inproc_channel>(hosts[i]) : nullptr;
  };
  auto rc = router_core::make(p->mcfg, *p->ckpt, connect, cfg.batcher, cfg.replica_wait);
  if (!rc) return rc.error();
  p->router_half = std::move(*rc);

  p->sys_cfg.set("scheduler.max-threads", 2);
  p->sys = std::make_unique<caf::actor_system>(p->sys_cfg);
  metrics::declare_coordinator();
  p->coordinator = p->sys->spawn(coordinator_actor, *p->mcfg, cfg.hosts, cfg.replicas, cfg.heartbeat, cfg.rebalance,
                                 std::string{}, std::chrono::milliseconds(10000));
  p->router = p->sys->spawn(router_actor, p->coordinator, p->router_half->executor(), cfg.rebalance.report_interval);
  for (int h = 0; h < cfg.hosts; ++h)
    p->host_actors.push_back(p->sys->spawn(host_actor, p->coordinator, p->hosts[static_cast<size_t>(h)],
                                           "inproc://" + std::to_string(h), p->mcfg, p->ckpt));
  return std::unique_ptr<embedded_cluster>(new embedded_cluster(std::move(p)));
}

bool embedded_cluster::ready() const { return impl_->router_half->ready(); }
bool embedded_cluster::wait_ready(std::chrono::milliseconds timeout) const { return impl_->router_half->wait_ready(timeout); }
uint64_t embedded_cluster::epoch() const { return impl_->router_half->executor()->epoch(); }
caf::error embedded_cluster::submit(scheduler::generation_request r) { return impl_->router_half->submit(std::move(r)); }
const model::model_config& embedded_cluster::config() const { return *impl_->mcfg; }
size_t embedded_cluster::queued() const { return impl_->router_half->queued(); }
size_t embedded_cluster::running() const { return impl_->router_half->running(); }

void embedded_cluster::kill_host(int h) {
  if (h < 0 || h >= static_cast<int>(impl_->hosts.size())) return;
  impl_->hosts[static_cast<size_t>(h)]->set_alive(false);
  caf::anon_send_exit(impl_->host_actors[static_cast<size_t>(h)], caf::exit_reason::kill);
}

void embedded_cluster::freeze_host(int h) {
  if (h < 0 || h >= static_cast<int>(impl_->host_actors.size())) return;
  caf::anon_send(impl_->host_actors[static_cast<size_t>(h)], freeze_atom::value);
}

caf::expected<std::string> embedded_cluster::rebalance(std::chrono::milliseconds timeout) {
  caf::scoped_actor self{*impl_->sys};
  caf::expected<std::string> out = model::make_error(model::model_errc::io_error, "no answer from the coordinator");
  self->request(impl_->coordinator, timeout, rebalance_atom::value)
      .receive([&](const std::string& summary) { out = summary; },
               [&](caf::error& err) {
                 out = model::make_error(model::model_errc::io_error, "rebalance: " + impl_->sys->render(err));
               });
  return out;
}

std::string embedded_cluster::state_json() const { return impl_->router_half->executor()->state_json(); }

placement_table embedded_cluster::placement() const { return impl_->router_half->executor()->placement(); }

std::vector<uint64_t> embedded_cluster::host_batches() const {
  std::vector<uint64_t> out;
  for (auto& h : impl_->hosts) out.push_back(h->batches_served());
  return out;
}

void embedded_cluster::drain() { impl_->router_half->drain(); }
bool embedded_cluster::idle() const { return impl_->router_half->idle(); }

int embedded_cluster::hosts_up() const { return impl_->router_half->executor()->hosts_up(); }
std::vector<host_info> embedded_cluster::hosts() const { return impl_->router_half->executor()->hosts(); }

void embedded_cluster::shutdown() {
  if (!impl_ || impl_->down) return;
  impl_->down = true;
  impl_->router_half->stop();
  // The coordinator goes first, so the hosts' exits are not reported as failures.
  caf::anon_send_exit(impl_->coordinator, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(impl_->router, caf::exit_reason::user_shutdown);
  for (auto& a : impl_->host_actors) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  impl_->sys.reset();  // waits for the actors to finish
}

}  // namespace sy::actors
