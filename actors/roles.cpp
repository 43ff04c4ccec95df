#include "actors/roles.hpp"

#include "actors/cluster_actors.hpp"
#include "actors/link_channel.hpp"
#include "actors/messages.hpp"
#include "actors/observe.hpp"
#include "actors/router_core.hpp"
#include "model/kernels.hpp"
#include "model/weights.hpp"
#include "transport/ucx_link.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>

namespace sy::actors {

namespace {

std::unique_ptr<caf::actor_system> make_system(caf::actor_system_config& cfg) {
  cfg.load<caf::io::middleman>();
  register_message_types(cfg);
  cfg.set("scheduler.max-threads", 2);
  return std::make_unique<caf::actor_system>(cfg);
}

caf::expected<caf::actor> connect_coordinator(caf::actor_system& sys, const std::string& host, uint16_t port) {
  // The coordinator may still be starting: retry for a while.
  caf::error last;
  for (int i = 0; i < 100; ++i) {
    auto a = sys.middleman().remote_actor(host, port);
    if (a) return *a;
    last = a.error();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return model::make_error(model::model_errc::io_error, "cannot reach the coordinator at " + host + ":" + std::to_string(port) +
                                                            ": " + sys.render(last));
}

/// Keeps an actor connected to the coordinator: whenever the actor ends (it does when the
/// coordinator goes away), reconnects — retrying until stopped — and spawns it again. The data
/// plane is not touched meanwhile: hosts keep serving batches and routers keep routing on their
/// last placement.
class reconnector {
 public:
  using spawn_fn = std::function<caf::actor(caf::actor coordinator)>;
  reconnector(caf::actor_system& sys, std::string host, uint16_t port, caf::actor coordinator, spawn_fn spawn, std::string who)
      : sys_(sys), host_(std::move(host)), port_(port), spawn_(std::move(spawn)), who_(std::move(who)) {
    coordinator_ = coordinator;
    actor_ = spawn_(coordinator);
    thread_ = std::thread([this] { loop(); });
  }
  ~reconnector() { stop(); }

  void stop() {
    if (stopping_.exchange(true)) return;
    caf::actor a;
    {
      std::lock_guard lock(mu_);
      a = actor_;
    }
    caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    if (thread_.joinable()) thread_.join();
  }

  [[nodiscard]] caf::actor coordinator() const {
    std::lock_guard lock(mu_);
    return coordinator_;
  }

 private:
  void loop() {
    while (!stopping_) {
      caf::actor a;
      {
        std::lock_guard lock(mu_);
        a = actor_;
      }
      {
        caf::scoped_actor self{sys_};
        self->monitor(a);
        self->receive([](const caf::down_msg&) {});
      }
      if (stopping_) break;
      spdlog::warn("{}: lost the coordinator at {}:{}; reconnecting", who_, host_, port_);
      caf::actor coord;
      while (!stopping_) {
        auto c = sys_.middleman().remote_actor(host_, port_);
        if (c) {
          coord = *c;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
      if (stopping_) break;
      auto next = spawn_(coord);
      {
        std::lock_guard lock(mu_);
        coordinator_ = coord;
        actor_ = next;
      }
      spdlog::warn("{}: reconnected to the coordinator", who_);
    }
  }

  caf::actor_system& sys_;
  std::string host_;
  uint16_t port_;
  spawn_fn spawn_;
  std::string who_;
  mutable std::mutex mu_;
  caf::actor coordinator_, actor_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace

// ---- coordinator ----

struct coordinator_process::impl {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::actor coordinator;
  uint16_t port = 0;
};

coordinator_process::coordinator_process(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
coordinator_process::~coordinator_process() { stop(); }

caf::expected<std::unique_ptr<coordinator_process>> coordinator_process::start(const coordinator_options& o) {
  auto mc = model::load_config(o.model);
  if (!mc) return mc.error();
  auto p = std::make_unique<impl>();
  p->sys = make_system(p->cfg);
  metrics::declare_coordinator();
  p->coordinator = p->sys->spawn(coordinator_actor, *mc, o.hosts, o.replicas, o.heartbeat, o.rebalance, o.state_file,
                                 o.recovery_wait);
  auto port = p->sys->middleman().publish(p->coordinator, o.port, o.host.c_str(), true);
  if (!port)
    return model::make_error(model::model_errc::io_error, "--listen: cannot publish the coordinator on " + o.host + ":" +
                                                              std::to_string(o.port) + ": " + p->sys->render(port.error()));
  p->port = *port;
  return std::unique_ptr<coordinator_process>(new coordinator_process(std::move(p)));
}

uint16_t coordinator_process::port() const { return impl_->port; }

void coordinator_process::stop() {
  if (!impl_ || !impl_->sys) return;
  caf::anon_send_exit(impl_->coordinator, caf::exit_reason::user_shutdown);
  impl_->sys.reset();
}

// ---- expert host ----

struct expert_host_process::impl {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::shared_ptr<transport::ucx_runtime> ucx;
  std::unique_ptr<transport::ucx_server> server;
  std::shared_ptr<expert_host_core> core;
  std::unique_ptr<reconnector> link;
  std::unique_ptr<metrics::link_watch> link_metrics;  ///< after `server`: gone before it
};

expert_host_process::expert_host_process(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
expert_host_process::~expert_host_process() { stop(); }

caf::expected<std::unique_ptr<expert_host_process>> expert_host_process::start(const expert_host_options& o) {
  model::set_kernel_threads(o.threads);
  auto mc = model::load_config(o.model);
  if (!mc) return mc.error();
  auto ck = model::checkpoint::open(o.model);
  if (!ck) return ck.error();
  if (o.slots < 1) return model::make_error(model::model_errc::invalid_argument, "--slots must be at least 1");
  auto p = std::make_unique<impl>();
  const std::string name = o.name.empty() ? "expert-host-" + std::to_string(::getpid()) : o.name;
  p->core = std::make_shared<expert_host_core>(name, o.slots);
  p->core->set_device(o.device);
  auto rt = transport::ucx_runtime::make();
  if (!rt) return rt.error();
  p->ucx = *rt;
  transport::ucx_server_options so;
  so.host = o.listen_host;
  so.port = o.listen_port;
  so.peer_error_handling = o.peer_error_handling;
  auto server = transport::ucx_server::make(p->ucx, host_request_handler(p->core), so);
  if (!server) return server.error();
  p->server = std::move(*server);
  p->link_metrics = std::make_unique<metrics::link_watch>(name, [s = p->server.get()] { return link_counts_of(s->stats()); });
  p->sys = make_system(p->cfg);
  auto coord = connect_coordinator(*p->sys, o.coordinator_host, o.coordinator_port);
  if (!coord) return coord.error();
  const std::string address = "ucx://" + o.listen_host + ":" + std::to_string(p->server->port());
  auto cfg = std::make_shared<const model::model_config>(std::move(*mc));
  auto ckpt = std::make_shared<const model::checkpoint>(std::move(*ck));
  auto* sys = p->sys.get();
  p->link = std::make_unique<reconnector>(
      *sys, o.coordinator_host, o.coordinator_port, *coord,
      [sys, core = p->core, address, cfg, ckpt](caf::actor c) { return sys->spawn(host_actor, c, core, address, cfg, ckpt); },
      name);
  return std::unique_ptr<expert_host_process>(new expert_host_process(std::move(p)));
}

uint16_t expert_host_process::data_port() const { return impl_->server->port(); }

void expert_host_process::stop() {
  if (!impl_ || !impl_->sys) return;
  impl_->server->stop();
  impl_->link.reset();
  impl_->sys.reset();
}

// ---- router ----

struct router_process::impl {
  std::shared_ptr<transport::ucx_runtime> ucx;
  std::unique_ptr<router_core> core;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<reconnector> link;
  bool down = false;
};

router_process::router_process(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
router_process::~router_process() { stop(); }

caf::expected<std::unique_ptr<router_process>> router_process::start(const router_options& o) {
  model::set_kernel_threads(o.threads);
  auto p = std::make_unique<impl>();
  auto mc = model::load_config(o.model);
  if (!mc) return mc.error();
  auto mcfg = std::make_shared<const model::model_config>(std::move(*mc));
  auto ck = model::checkpoint::open(o.model);
  if (!ck) return ck.error();
  auto rt = transport::ucx_runtime::make();
  if (!rt) return rt.error();
  p->ucx = *rt;
  const int64_t hidden = mcfg->hidden_size;
  const auto dtype = o.wire_bf16 ? transport::wire_dtype::bf16 : transport::wire_dtype::f32;
  // A host's data address is ucx://HOST:PORT; one link per host, opened on first use.
  auto connect = [ucx = p->ucx, hidden, dtype, o](const host_info& h) -> std::shared_ptr<expert_channel> {
    const std::string prefix = "ucx://";
    if (!h.data_address.starts_with(prefix)) return nullptr;
    const auto hostport = h.data_address.substr(prefix.size());
    const auto colon = hostport.rfind(':');
    if (colon == std::string::npos) return nullptr;
    transport::ucx_client_options co;
    co.peer_error_handling = o.peer_error_handling;
    auto c = transport::ucx_client::make(ucx, hostport.substr(0, colon),
                                         static_cast<uint16_t>(std::stoi(hostport.substr(colon + 1))), co);
    if (!c) {
      spdlog::warn("router: cannot connect to {} at {}: {}", h.name, h.data_address, model::describe(c.error()));
      return nullptr;
    }
    return std::make_shared<link_channel>(std::shared_ptr<transport::link_client>(std::move(*c)), hidden, dtype,
                                          o.batch_timeout, h.name);
  };
  auto core = router_core::make(mcfg, *ck, connect, o.batcher, o.replica_wait, /*overlaps=*/true, o.micro_batches,
                               o.micro_batch_min_rows);
  if (!core) return core.error();
  p->core = std::move(*core);
  p->sys = make_system(p->cfg);
  auto coord = connect_coordinator(*p->sys, o.coordinator_host, o.coordinator_port);
  if (!coord) return coord.error();
  auto* sys = p->sys.get();
  p->link = std::make_unique<reconnector>(
      *sys, o.coordinator_host, o.coordinator_port, *coord,
      [sys, exec = p->core->executor(), ri = o.report_interval](caf::actor c) { return sys->spawn(router_actor, c, exec, ri); },
      "router");
  return std::unique_ptr<router_process>(new router_process(std::move(p)));
}

caf::expected<std::string> router_process::rebalance(std::chrono::milliseconds timeout) {
  caf::scoped_actor self{*impl_->sys};
  caf::expected<std::string> out = model::make_error(model::model_errc::io_error, "no answer from the coordinator");
  self->request(impl_->link->coordinator(), timeout, rebalance_atom::value)
      .receive([&](const std::string& summary) { out = summary; },
               [&](caf::error& err) {
                 out = model::make_error(model::model_errc::io_error, "rebalance: " + impl_->sys->render(err));
               });
  return out;
}

void router_process::drain() { impl_->core->drain(); }
std::string router_process::state_json() const { return impl_->core->executor()->state_json(); }
bool router_process::idle() const { return impl_->core->idle(); }

bool router_process::ready() const { return impl_->core->ready(); }
bool router_process::wait_ready(std::chrono::milliseconds timeout) const { return impl_->core->wait_ready(timeout); }
uint64_t router_process::epoch() const { return impl_->core->executor()->epoch(); }
placement_table router_process::placement() const { return impl_->core->executor()->placement(); }
int router_process::hosts_up() const { return impl_->core->executor()->hosts_up(); }
std::vector<host_info> router_process::hosts() const { return impl_->core->executor()->hosts(); }
caf::error router_process::submit(scheduler::generation_request r) { return impl_->core->submit(std::move(r)); }
const model::model_config& router_process::config() const { return impl_->core->config(); }

void router_process::stop() {
  if (!impl_ || impl_->down) return;
  impl_->down = true;
  impl_->core->stop();
  impl_->link.reset();
  impl_->sys.reset();
  impl_->core.reset();  // closes the data-plane links before the UCX runtime goes
}

}  // namespace sy::actors
