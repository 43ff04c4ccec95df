#include "transport/ucx_link.hpp"

#include "transport/internal/counters.hpp"
#include "transport/internal/task.hpp"
#include "transport/internal/ucx_am.hpp"
#include "transport/internal/worker_pool.hpp"

#include <ucp/api/ucp.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <unordered_map>

namespace sy::transport {

namespace {

using clock = std::chrono::steady_clock;

using internal::am_id_reply;
using internal::am_id_request;

std::string ucx_text(ucs_status_t s) { return ucs_status_string(s); }

/// How long a spinning driver has been idle. A pass is tens of ns and a clock read as much, so the
/// clock is read once per 32 idle passes; the first read after activity starts the idle period.
class idle_watch {
 public:
  void active() { passes_ = 0; }
  /// Counts an idle pass: how long the driver has been idle if this pass read the clock.
  std::optional<clock::duration> idle() {
    if (++passes_ % 32 != 0) return std::nullopt;
    const auto now = clock::now();
    if (passes_ == 32) since_ = now;
    return now - since_;
  }

 private:
  unsigned passes_ = 0;
  clock::time_point since_{};
};

/// Shared-memory segments large enough for one eager fragment of a one-row batch up to hidden 8192
/// in bf16 (or two rows at hidden 4096) with our frame header and UCP's: UCX's default of 8256 bytes
/// leaves no room for the headers around an 8 KiB row, and the second fragment costs more than the
/// row's copy (measured in docs/transport.md). UCX reads these from the environment only
/// (ucp_config_modify does not reach the transports in 1.13), so they are set there, once, before
/// the first context, unless the environment already has them.
void default_shm_segments() {
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string bytes = std::to_string((size_t{16} << 10) + 512);
    for (const char* name : {"UCX_SYSV_SEG_SIZE", "UCX_POSIX_SEG_SIZE"}) ::setenv(name, bytes.c_str(), 0);
  });
}

caf::expected<sockaddr_in> make_sockaddr(const std::string& host, uint16_t port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1)
    return make_error(wire_errc::invalid_argument, "ucx: '" + host + "' is not an IPv4 address");
  return sa;
}

}  // namespace

/// Something an endpoint belongs to: a client link or one of a server's connections. All calls on
/// the driving thread (see ucx_runtime::impl).
struct ep_owner {
  virtual ~ep_owner() = default;
  virtual ucs_status_t on_frame(unsigned am_id, std::span<const std::byte> header, void* data, size_t length,
                                uint64_t recv_attr) = 0;
  virtual void on_ep_error(ucs_status_t status) = 0;
  virtual void on_send_failed(uint64_t /*batch_id*/, ucs_status_t /*status*/) {}
};

namespace {

/// A frame being sent: owns the AM header and the rows until UCX is done with them. Headers of up
/// to 8 segments are encoded into the frame itself (no allocation); larger ones and error frames
/// into a vector. Held by unique_ptr and never moved, so `header` may point into it.
struct outbound {
  static constexpr size_t inline_bytes = wire_fixed_bytes + 8 * wire_segment_bytes;
  std::span<const std::byte> header;
  token_batch batch;  // empty for error frames
  std::shared_ptr<ep_owner> owner;
  uint64_t batch_id = 0;
  std::array<std::byte, inline_bytes> inline_header;
  std::vector<std::byte> spilled;

  outbound() = default;
  outbound(const outbound&) = delete;  // `header` may point into this object
  outbound& operator=(const outbound&) = delete;

  void encode(frame_kind kind, const batch_header& h) {
    const size_t n = h.header_bytes();
    if (n <= inline_bytes) {
      encode_header_into(kind, h, {inline_header.data(), n});
      header = {inline_header.data(), n};
    } else {
      spilled = encode_header(kind, h);
      header = spilled;
    }
  }
  void take(std::vector<std::byte> bytes) {
    spilled = std::move(bytes);
    header = spilled;
  }
};

void send_done(void* request, ucs_status_t status, void* user_data) noexcept {
  auto* ob = static_cast<outbound*>(user_data);
  if (status != UCS_OK && ob->owner) ob->owner->on_send_failed(ob->batch_id, status);
  delete ob;
  ucp_request_free(request);
}

/// Sends `ob` as an active message; UCX_OK or UCS_INPROGRESS on success.
ucs_status_t am_send(ucp_ep_h ep, unsigned id, std::unique_ptr<outbound> ob) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS |
                   UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  p.flags = UCP_AM_SEND_FLAG_REPLY;  // the receiver learns which endpoint the frame came on
  p.cb.send = send_done;
  p.user_data = ob.get();
  p.memory_type = UCS_MEMORY_TYPE_HOST;
  auto payload = ob->batch.rows.bytes();
  ucs_status_ptr_t sp = ucp_am_send_nbx(ep, id, ob->header.data(), ob->header.size(), payload.data(), payload.size(), &p);
  if (sp == nullptr) return UCS_OK;
  if (UCS_PTR_IS_ERR(sp)) return UCS_PTR_STATUS(sp);
  (void)ob.release();  // send_done frees it
  return UCS_INPROGRESS;
}

}  // namespace

/// Nodes taken out of a node-based map (`extract`), kept for the next insert so that a map whose
/// entries come and go once per message allocates nothing in steady state; beyond `max_kept`
/// nodes (a window of requests in flight) they are freed as usual.
template <class Map>
class spare_nodes {
 public:
  static constexpr size_t max_kept = 64;
  /// Inserts (key, value), into a kept node when there is one; returns the entry's iterator.
  typename Map::iterator insert(Map& m, typename Map::key_type key, typename Map::mapped_type value) {
    if (nodes_.empty()) {
      auto r = m.emplace(std::move(key), std::move(value));
      if constexpr (std::is_same_v<decltype(r), typename Map::iterator>) return r;
      else return r.first;
    }
    auto node = std::move(nodes_.back());
    nodes_.pop_back();
    node.key() = std::move(key);
    node.mapped() = std::move(value);
    auto r = m.insert(std::move(node));
    if constexpr (std::is_same_v<decltype(r), typename Map::iterator>) return r;
    else return r.position;
  }
  /// Takes the entry at `it` out of `m`; returns its value, and keeps the node (emptied first, so a
  /// kept node holds nothing of the value's, such as a callback's captures).
  typename Map::mapped_type remove(Map& m, typename Map::iterator it) {
    auto node = m.extract(it);
    auto value = std::move(node.mapped());
    node.mapped() = typename Map::mapped_type{};
    if (nodes_.size() < max_kept) nodes_.push_back(std::move(node));
    return value;
  }

 private:
  std::vector<typename Map::node_type> nodes_;
};

struct ucx_runtime::impl : std::enable_shared_from_this<ucx_runtime::impl> {
  ucx_runtime_options options;
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int worker_fd = -1;
  int event_fd = -1;
  int epoll_fd = -1;
  size_t max_am_header = 0;

  std::thread thread;
  std::mutex mu;
  std::vector<internal::task> tasks;
  std::atomic<bool> has_tasks{false};
  std::atomic<bool> exit{false};
  std::atomic<uint64_t> unattributed{0};

  // The worker is driven by whoever holds `drive_mu`: the progress thread, or a thread waiting in
  // ucx_client::call_sync. Everything below `driver` is touched only by the holder.
  std::mutex drive_mu;
  std::atomic<std::thread::id> driver{};
  std::atomic<int> callers_driving{0};  // call_sync callers that drive or want to
  enum class progress_state : int { active, epoll, parked };
  std::atomic<progress_state> state{progress_state::active};
  std::mutex park_mu;
  std::condition_variable park_cv;
  std::atomic<int64_t> awaiting{0};    // replies this process waits for, or handler replies to send
  std::atomic<int64_t> listeners{0};   // servers on this runtime (their requests need a driver)

  std::unordered_map<ucp_ep_h, std::shared_ptr<ep_owner>> owners;
  struct timer_ref {
    struct ucx_client::state* client;
    uint64_t batch_id;
  };
  using timer_map = std::multimap<clock::time_point, timer_ref>;
  timer_map timers;
  spare_nodes<timer_map> spare_timers;  // nodes of removed timers, reused (no allocation per call)
  unsigned timer_passes = 0;  // passes since the timers were last looked at

  timer_map::iterator add_timer(clock::time_point at, timer_ref ref) { return spare_timers.insert(timers, at, ref); }
  void remove_timer(timer_map::iterator it) { (void)spare_timers.remove(timers, it); }
  std::vector<void*> closing;  // ep close requests not yet complete
  std::vector<internal::task> running;

  ~impl();
  caf::error start();
  void loop();
  bool init_on_thread(std::string& why);
  void post(internal::task t);
  /// One turn: queued tasks, worker progress, close requests, timers. Returns whether anything
  /// happened. Only the driver calls it.
  ///
  /// Nothing may leave it by an exception, whichever thread drives: callbacks and handlers must
  /// not throw (link.hpp), and one that does (or an allocation failing in the runtime's own
  /// bookkeeping) ends the process here, as it would on the progress thread. The alternative is
  /// worse: an exception leaving a waiting caller's pass would skip releasing `drive_mu` and the
  /// driver count (the worker then has no driver, ever), unwind through UCX's C frames, and leave
  /// that caller's pending callback pointing into a stack frame that is gone. A dead process is
  /// found at once by its peers and the coordinator; a wedged one only by timeouts.
  bool pass() noexcept;
  bool drives() const { return driver.load(std::memory_order_relaxed) == std::this_thread::get_id(); }
  bool try_drive() {
    if (!drive_mu.try_lock()) return false;
    driver.store(std::this_thread::get_id());
    return true;
  }
  /// A call_sync caller stops driving. Returns whether the worker still has work a driver must
  /// watch (read while still holding it).
  bool stop_driving() {
    const bool work = awaiting.load() > 0 || listeners.load() > 0 || !closing.empty() || has_tasks.load();
    driver.store({});
    drive_mu.unlock();
    return work;
  }
  /// After the last caller left: the progress thread takes the worker back. If it sleeps in epoll
  /// its arm may be stale (someone else progressed the worker), so it is woken to re-arm; if it is
  /// parked it is woken when work is waiting (otherwise it resumes by itself within 1 ms).
  void hand_back(bool work) {
    if (callers_driving.load() != 0) return;
    const auto s = state.load();
    if (s == progress_state::epoll) {
      wake_epoll();
    } else if (s == progress_state::parked && (work || has_tasks.load())) {
      { std::lock_guard lock(park_mu); }
      park_cv.notify_one();
    }
  }
  void wake_epoll() {
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(event_fd, &one, sizeof one);
  }
  template <class F>
  auto run_sync(F&& f) -> std::invoke_result_t<F> {
    if (drives()) return f();
    std::packaged_task<std::invoke_result_t<F>()> pt(std::forward<F>(f));
    auto fut = pt.get_future();
    post([pt = std::move(pt)]() mutable { pt(); });
    return fut.get();
  }
  void close_ep(ucp_ep_h ep, bool force);
  void fire_timers(clock::time_point now);
  void poll_closing();

  static ucs_status_t on_am(void* arg, const void* header, size_t header_length, void* data, size_t length,
                            const ucp_am_recv_param_t* param, unsigned am_id) noexcept {
    auto* rt = static_cast<impl*>(arg);
    if (!(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) || param->reply_ep == nullptr) {
      rt->unattributed.fetch_add(1, std::memory_order_relaxed);
      return UCS_OK;
    }
    auto it = rt->owners.find(param->reply_ep);
    if (it == rt->owners.end()) {
      rt->unattributed.fetch_add(1, std::memory_order_relaxed);
      return UCS_OK;
    }
    auto owner = it->second;  // a copy: the owner may close itself meanwhile
    return owner->on_frame(am_id, {static_cast<const std::byte*>(header), header_length}, data, length,
                           param->recv_attr);
  }
  static ucs_status_t on_am_request(void* arg, const void* h, size_t hl, void* d, size_t l, const ucp_am_recv_param_t* p) noexcept {
    return on_am(arg, h, hl, d, l, p, am_id_request);
  }
  static ucs_status_t on_am_reply(void* arg, const void* h, size_t hl, void* d, size_t l, const ucp_am_recv_param_t* p) noexcept {
    return on_am(arg, h, hl, d, l, p, am_id_reply);
  }
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) noexcept {
    auto* rt = static_cast<impl*>(arg);
    auto it = rt->owners.find(ep);
    if (it == rt->owners.end()) return;
    auto owner = it->second;
    owner->on_ep_error(status);
  }
};

// ---------------------------------------------------------------------------------------------
// Runtime

ucx_runtime::impl::~impl() {
  if (epoll_fd >= 0) ::close(epoll_fd);
  if (event_fd >= 0) ::close(event_fd);
}

void ucx_runtime::impl::post(internal::task t) {
  {
    std::lock_guard lock(mu);
    tasks.push_back(std::move(t));
  }
  has_tasks.store(true);
  const auto s = state.load();
  if (s == progress_state::epoll) {
    wake_epoll();
  } else if (s == progress_state::parked && callers_driving.load() == 0) {
    { std::lock_guard lock(park_mu); }
    park_cv.notify_one();
  }  // else the progress thread is active, or a driving caller runs the task
}

bool ucx_runtime::impl::init_on_thread(std::string& why) {
  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) {
    why = "ucp_config_read: " + ucx_text(st);
    return false;
  }
  for (const auto& [key, value] : options.config) {
    st = ucp_config_modify(config, key.c_str(), value.c_str());
    if (st != UCS_OK) {
      ucp_config_release(config);
      why = "UCX setting " + key + "=" + value + ": " + ucx_text(st);
      return false;
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  st = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (st != UCS_OK) {
    why = "ucp_init: " + ucx_text(st);
    return false;
  }
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // one driver at a time (drive_mu), not always the same thread
  st = ucp_worker_create(context, &wp, &worker);
  if (st != UCS_OK) {
    why = "ucp_worker_create: " + ucx_text(st);
    return false;
  }
  ucp_worker_attr_t wa{};
  wa.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  if (ucp_worker_query(worker, &wa) == UCS_OK) max_am_header = wa.max_am_header;
  st = ucp_worker_get_efd(worker, &worker_fd);
  if (st != UCS_OK) {
    why = "ucp_worker_get_efd: " + ucx_text(st);
    return false;
  }
  for (auto [id, cb] : {std::pair{am_id_request, &impl::on_am_request}, std::pair{am_id_reply, &impl::on_am_reply}}) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG |
                    UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    hp.id = id;
    hp.cb = cb;
    hp.arg = this;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    st = ucp_worker_set_am_recv_handler(worker, &hp);
    if (st != UCS_OK) {
      why = "ucp_worker_set_am_recv_handler: " + ucx_text(st);
      return false;
    }
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, worker_fd, &ev) != 0 ||
      ::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, event_fd, &ev) != 0) {
    why = "epoll_ctl failed";
    return false;
  }
  return true;
}

caf::error ucx_runtime::impl::start() {
  default_shm_segments();
  event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (event_fd < 0 || epoll_fd < 0) return make_error(wire_errc::ucx_error, "ucx: cannot create eventfd/epoll");
  std::promise<std::string> ready;
  auto ready_future = ready.get_future();
  thread = std::thread([self = shared_from_this(), &ready] {
    std::string why;
    const bool ok = self->init_on_thread(why);
    ready.set_value(ok ? std::string{} : why);
    if (ok) self->loop();
    if (self->worker != nullptr) ucp_worker_destroy(self->worker);
    if (self->context != nullptr) ucp_cleanup(self->context);
    self->worker = nullptr;
    self->context = nullptr;
  });
  std::string why = ready_future.get();
  if (!why.empty()) {
    thread.join();
    return make_error(wire_errc::ucx_error, "ucx: " + why);
  }
  return {};
}

void ucx_runtime::impl::close_ep(ucp_ep_h ep, bool force) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t sp = ucp_ep_close_nbx(ep, &p);
  if (UCS_PTR_IS_PTR(sp)) closing.push_back(sp);
}

void ucx_runtime::impl::poll_closing() {
  for (size_t i = 0; i < closing.size();) {
    if (ucp_request_check_status(closing[i]) != UCS_INPROGRESS) {
      ucp_request_free(closing[i]);
      closing[i] = closing.back();
      closing.pop_back();
    } else {
      ++i;
    }
  }
}

bool ucx_runtime::impl::pass() noexcept {
  bool active = false;
  if (has_tasks.load()) {
    {
      std::lock_guard lock(mu);
      running.swap(tasks);
      has_tasks.store(false);
    }
    for (auto& t : running) t();
    running.clear();
    active = true;
  }
  for (int i = 0; i < 64 && ucp_worker_progress(worker) != 0; ++i) active = true;
  if (!closing.empty()) poll_closing();
  // Deadlines are milliseconds away; looking every 16th pass keeps clock reads off the spin path.
  if (!timers.empty() && ++timer_passes >= 16) {
    timer_passes = 0;
    fire_timers(clock::now());
  }
  return active;
}

void ucx_runtime::impl::loop() {
  std::unique_lock drive(drive_mu, std::defer_lock);
  idle_watch idle;
  for (;;) {
    if (!drive.owns_lock()) {
      // A caller in call_sync drives the worker: stay out of its way (no spinning next to it).
      if (callers_driving.load() > 0 && !exit.load()) {
        state.store(progress_state::parked);
        {
          std::unique_lock park(park_mu);
          park_cv.wait_for(park, std::chrono::milliseconds(1),
                           [&] { return callers_driving.load() == 0 || exit.load(); });
        }
        state.store(progress_state::active);
        continue;
      }
      state.store(progress_state::active);
      drive.lock();
      driver.store(std::this_thread::get_id());
    }
    const bool active = pass();
    if (exit.load() && !has_tasks.load()) break;
    if (active) {
      idle.active();
      continue;
    }
    const auto idle_for = idle.idle();
    if (!idle_for || *idle_for < options.spin || (awaiting.load() > 0 && *idle_for < options.spin_awaiting)) {
      if (callers_driving.load() > 0) {  // a caller wants to drive: hand it the worker
        driver.store({});
        drive.unlock();
      }
      continue;
    }

    state.store(progress_state::epoll);
    if (has_tasks.load() || exit.load() || callers_driving.load() > 0) {
      state.store(progress_state::active);
      if (callers_driving.load() > 0) {
        driver.store({});
        drive.unlock();
      }
      continue;
    }
    if (ucp_worker_arm(worker) == UCS_ERR_BUSY) {
      state.store(progress_state::active);
      continue;
    }
    int timeout_ms = -1;
    if (!timers.empty()) {
      auto wait = std::chrono::ceil<std::chrono::milliseconds>(timers.begin()->first - clock::now()).count();
      timeout_ms = static_cast<int>(std::clamp<int64_t>(wait, 0, 1000));
    }
    if (!closing.empty()) timeout_ms = timeout_ms < 0 ? 10 : std::min(timeout_ms, 10);
    driver.store({});
    drive.unlock();
    epoll_event events[2];
    (void)::epoll_wait(epoll_fd, events, 2, timeout_ms);
    uint64_t drained = 0;
    [[maybe_unused]] auto n = ::read(event_fd, &drained, sizeof drained);
    idle.active();  // whoever drove meanwhile, look again (a full spin) before sleeping
  }
  // Leaving: close what is left, give close requests a bounded time to finish.
  auto owners_left = std::move(owners);
  for (auto& [ep, owner] : owners_left) owner->on_ep_error(UCS_ERR_CANCELED);
  const auto deadline = clock::now() + std::chrono::seconds(1);
  while (!closing.empty() && clock::now() < deadline) {
    ucp_worker_progress(worker);
    poll_closing();
  }
  for (void* r : closing) ucp_request_free(r);
  closing.clear();
}

caf::expected<std::shared_ptr<ucx_runtime>> ucx_runtime::make(ucx_runtime_options options) {
  auto i = std::make_shared<impl>();
  i->options = std::move(options);
  if (auto err = i->start()) return err;
  return std::shared_ptr<ucx_runtime>(new ucx_runtime(std::move(i)));
}

ucx_runtime::~ucx_runtime() {
  impl_->post([self = impl_.get()] { self->exit.store(true); });
  if (!impl_->thread.joinable()) return;
  if (impl_->thread.get_id() == std::this_thread::get_id())
    impl_->thread.detach();  // dropped from a callback: the loop ends after this task, then cleans up
  else
    impl_->thread.join();
}

size_t ucx_runtime::max_am_header() const { return impl_->max_am_header; }

uint64_t ucx_runtime::unattributed_frames() const { return impl_->unattributed.load(); }

// ---------------------------------------------------------------------------------------------
// Client

struct ucx_client::state final : ep_owner, std::enable_shared_from_this<ucx_client::state> {
  ucx_runtime::impl* rt = nullptr;
  bool peer_mode = true;
  ucp_ep_h ep = nullptr;        // driver only
  std::atomic<bool> open{false};
  std::string peer;             // "host:port", for messages
  internal::link_counters counters;

  struct pending_call {
    reply_callback callback;
    batch_header req;
    ucx_runtime::impl::timer_map::iterator timer;
    bool receiving = false;
  };
  using pending_map = std::unordered_map<uint64_t, pending_call>;
  pending_map pending;                      // driver only
  spare_nodes<pending_map> spare_pending;   // driver only: nodes of completed calls, reused

  struct rx_op {
    std::shared_ptr<state> self;
    uint64_t batch_id;
    reply rep;
  };

  void start(std::unique_ptr<outbound> ob, reply_callback cb, clock::time_point deadline) {
    const uint64_t id = ob->batch.header.batch_id;
    if (!open.load()) {
      auto err = make_error(wire_errc::link_closed, "ucx: the link to " + peer + " is closed");
      counters.count_error(err);
      cb(std::move(err));
      return;
    }
    if (pending.count(id) != 0) {
      auto err = make_error(wire_errc::duplicate_batch,
                            "ucx: batch " + std::to_string(id) + " is already pending on the link to " + peer);
      counters.count_error(err);
      cb(std::move(err));
      return;
    }
    auto timer = rt->add_timer(deadline, ucx_runtime::impl::timer_ref{this, id});
    // The header is already encoded into ob->header; the pending call keeps it to check the reply.
    try {
      spare_pending.insert(pending, id, pending_call{std::move(cb), std::move(ob->batch.header), timer});
    } catch (...) {  // out of memory: no timer may outlive the call it would expire
      rt->remove_timer(timer);
      throw;
    }
    ++rt->awaiting;
    internal::link_counters::bump(counters.requests_sent);
    internal::link_counters::bump(counters.bytes_sent, ob->header.size() + ob->batch.rows.size());
    ob->owner = shared_from_this();
    ob->batch_id = id;
    const ucs_status_t st = am_send(ep, am_id_request, std::move(ob));
    if (UCS_STATUS_IS_ERR(st))
      complete(id, make_error(wire_errc::send_failed, "ucx: sending to " + peer + " failed: " + ucx_text(st)));
  }

  /// Delivers the outcome of request `id` if it is still pending (returns whether it was).
  bool complete(uint64_t id, caf::expected<reply> result) {
    auto it = pending.find(id);
    if (it == pending.end()) {
      if (result) internal::link_counters::bump(counters.late_replies);
      return false;
    }
    // The node is kept before the callback runs: a callback that sends the next request reuses it.
    auto call = spare_pending.remove(pending, it);
    --rt->awaiting;
    rt->remove_timer(call.timer);
    if (result)
      internal::link_counters::bump(counters.replies_received);
    else
      counters.count_error(result.error());
    call.callback(std::move(result));
    return true;
  }

  void fail_all(const caf::error& err) {
    auto calls = std::move(pending);
    pending.clear();
    rt->awaiting -= static_cast<int64_t>(calls.size());
    for (auto& [id, call] : calls) {
      rt->remove_timer(call.timer);
      counters.count_error(err);
      call.callback(err);
    }
  }

  /// Takes the endpoint out of service (driver only).
  void teardown(bool force) {
    open.store(false);
    if (ep == nullptr) return;
    rt->owners.erase(ep);
    rt->close_ep(ep, force);
    ep = nullptr;
    internal::link_counters::bump(counters.links_closed);
  }

  /// Closes after a failure seen inside a UCX callback: pending requests fail now, the endpoint is
  /// closed on the next loop turn (not from inside UCX's own callback).
  void fail_link(const caf::error& err, bool force) {
    open.store(false);
    fail_all(err);
    rt->post([self = shared_from_this(), force] { self->teardown(force); });
  }

  ucs_status_t on_frame(unsigned am_id, std::span<const std::byte> header, void* data, size_t length,
                        uint64_t recv_attr) override {
    if (!open.load()) return UCS_OK;
    internal::link_counters::bump(counters.bytes_received, header.size() + length);
    auto f = decode(header, length, rt->options.limits);
    caf::error bad;
    if (!f)
      bad = f.error();
    else if (am_id != am_id_reply || f->kind == frame_kind::request)
      bad = make_error(wire_errc::bad_kind, "ucx: a request frame arrived on the client link to " + peer);
    if (bad) {
      counters.count_error(bad);
      fail_link(make_error(wire_errc::link_closed,
                           "ucx: a malformed frame from " + peer + " closed the link: " + describe(bad)),
                peer_mode);
      return UCS_OK;
    }
    const uint64_t id = f->header.batch_id;
    auto it = pending.find(id);
    if (it == pending.end() || it->second.receiving) {
      internal::link_counters::bump(counters.late_replies);
      return UCS_OK;
    }
    if (f->kind == frame_kind::error) {
      internal::link_counters::bump(counters.errors_received);
      complete(id, std::move(f->error));
      return UCS_OK;
    }
    if (auto err = check_reply(it->second.req, f->header)) {
      complete(id, std::move(err));
      return UCS_OK;
    }
    auto buf = row_buffer::allocate(length);
    if (!buf) {
      complete(id, buf.error());
      return UCS_OK;
    }
    reply rep;
    rep.header = std::move(f->header);
    rep.rows = std::move(*buf);
    if (!(recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {  // eager: data is valid during this callback
      if (length != 0) std::memcpy(rep.rows.data(), data, length);
      complete(id, std::move(rep));
      return UCS_OK;
    }
    // Rendezvous: fetch the rows straight into the reply's buffer.
    it->second.receiving = true;
    auto* rx = new rx_op{shared_from_this(), id, std::move(rep)};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    p.cb.recv_am = &state::on_rx_done;
    p.user_data = rx;
    p.memory_type = UCS_MEMORY_TYPE_HOST;
    ucs_status_ptr_t sp = ucp_am_recv_data_nbx(rt->worker, data, rx->rep.rows.data(), length, &p);
    if (sp == nullptr) {
      finish_rx(rx, UCS_OK);
      delete rx;
    } else if (UCS_PTR_IS_ERR(sp)) {
      finish_rx(rx, UCS_PTR_STATUS(sp));
      delete rx;
    }
    return UCS_OK;
  }

  static void on_rx_done(void* request, ucs_status_t status, size_t /*length*/, void* user_data) noexcept {
    auto* rx = static_cast<rx_op*>(user_data);
    rx->self->finish_rx(rx, status);
    delete rx;
    ucp_request_free(request);
  }

  void finish_rx(rx_op* rx, ucs_status_t status) {
    auto it = pending.find(rx->batch_id);
    if (it != pending.end()) it->second.receiving = false;
    if (status == UCS_OK)
      complete(rx->batch_id, std::move(rx->rep));
    else
      complete(rx->batch_id, make_error(wire_errc::peer_failed,
                                        "ucx: receiving the rows of batch " + std::to_string(rx->batch_id) + " from " +
                                            peer + " failed: " + ucx_text(status)));
  }

  void on_ep_error(ucs_status_t status) override {
    if (!open.load() && ep == nullptr) return;
    fail_link(make_error(wire_errc::peer_failed, "ucx: the link to " + peer + " failed: " + ucx_text(status)), true);
  }

  void on_send_failed(uint64_t batch_id, ucs_status_t status) override {
    // A send that fails after it started means the endpoint is broken (UCX may report it here
    // before the endpoint's error callback): the whole link fails, as for an endpoint error.
    auto err = make_error(wire_errc::peer_failed, "ucx: sending batch " + std::to_string(batch_id) + " to " + peer +
                                                      " failed: " + ucx_text(status));
    if (open.load())
      fail_link(err, peer_mode);
    else
      complete(batch_id, std::move(err));
  }

  /// Fails request `id` with a timeout; false when no such call is pending (its timer stays).
  bool expire(uint64_t id) {
    return complete(id, make_error(wire_errc::timeout,
                                   "ucx: no reply from " + peer + " for batch " + std::to_string(id) + " in time"));
  }
};

void ucx_runtime::impl::fire_timers(clock::time_point now) {
  while (!timers.empty() && timers.begin()->first <= now) {
    const auto it = timers.begin();
    const auto ref = it->second;
    // Completing the call erases its timer; a timer with no call behind it is dropped here, or
    // this loop would never end.
    if (!ref.client->expire(ref.batch_id)) remove_timer(it);
  }
}

namespace {

struct flush_wait {
  std::promise<ucs_status_t> done;
};

void flush_done(void* request, ucs_status_t status, void* user_data) noexcept {
  auto* w = static_cast<std::shared_ptr<flush_wait>*>(user_data);
  (*w)->done.set_value(status);
  delete w;
  ucp_request_free(request);
}

}  // namespace

caf::expected<std::unique_ptr<ucx_client>> ucx_client::make(std::shared_ptr<ucx_runtime> runtime,
                                                             const std::string& host, uint16_t port,
                                                             ucx_client_options options) {
  if (!runtime) return make_error(wire_errc::invalid_argument, "ucx: a client needs a runtime");
  auto sa = make_sockaddr(host, port);
  if (!sa) return sa.error();
  auto* rt = runtime->impl_.get();
  auto st = std::make_shared<state>();
  st->rt = rt;
  st->peer_mode = options.peer_error_handling;
  st->peer = host + ":" + std::to_string(port);
  auto wait = std::make_shared<flush_wait>();
  auto flushed = wait->done.get_future();
  caf::error err = rt->run_sync([&]() -> caf::error {
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*sa);
    p.sockaddr.addrlen = sizeof(sockaddr_in);
    p.err_mode = options.peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    p.err_handler.cb = &ucx_runtime::impl::on_ep_error;
    p.err_handler.arg = rt;
    ucs_status_t s = ucp_ep_create(rt->worker, &p, &st->ep);
    if (s != UCS_OK) return make_error(wire_errc::connect_failed, "ucx: connecting to " + st->peer + ": " + ucx_text(s));
    st->open.store(true);
    rt->owners.emplace(st->ep, st);
    // A flush completes once the endpoint is wired up, or fails if the peer cannot be reached.
    ucp_request_param_t fp{};
    fp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    fp.cb.send = flush_done;
    auto* holder = new std::shared_ptr<flush_wait>(wait);
    fp.user_data = holder;
    ucs_status_ptr_t sp = ucp_ep_flush_nbx(st->ep, &fp);
    if (!UCS_PTR_IS_PTR(sp)) {
      delete holder;
      wait->done.set_value(UCS_PTR_STATUS(sp));
    }
    return {};
  });
  if (err) return err;
  std::unique_ptr<ucx_client> client(new ucx_client(std::move(runtime), st));
  if (flushed.wait_for(options.connect_timeout) != std::future_status::ready) {
    client->close();
    return make_error(wire_errc::connect_failed, "ucx: no connection to " + st->peer + " within " +
                                                     std::to_string(options.connect_timeout.count()) + " ms");
  }
  if (ucs_status_t s = flushed.get(); s != UCS_OK || !st->open.load()) {
    client->close();
    return make_error(wire_errc::connect_failed, "ucx: connecting to " + st->peer + " failed: " + ucx_text(s));
  }
  return client;
}

ucx_client::~ucx_client() { close(); }

void ucx_client::send(request req, std::chrono::milliseconds timeout, reply_callback on_reply) {
  auto& st = *state_;
  auto fail = [&](caf::error err) {
    st.counters.count_error(err);
    on_reply(std::move(err));
  };
  if (!st.open.load()) return fail(make_error(wire_errc::link_closed, "ucx: the link to " + st.peer + " is closed"));
  if (auto err = validate(req.header, req.rows.size(), st.rt->options.limits)) return fail(std::move(err));
  auto ob = std::make_unique<outbound>();
  ob->encode(frame_kind::request, req.header);
  if (st.rt->max_am_header != 0 && ob->header.size() > st.rt->max_am_header)
    return fail(make_error(wire_errc::too_many_segments, "ucx: a header of " + std::to_string(ob->header.size()) +
                                                             " bytes exceeds UCX's AM header limit of " +
                                                             std::to_string(st.rt->max_am_header)));
  ob->batch = std::move(static_cast<token_batch&>(req));
  const auto deadline = clock::now() + timeout;
  st.rt->post([s = state_, ob = std::move(ob), cb = std::move(on_reply), deadline]() mutable {
    s->start(std::move(ob), std::move(cb), deadline);
  });
}

caf::expected<reply> ucx_client::call_sync(request req, std::chrono::milliseconds timeout) {
  auto* rt = state_->rt;
  if (rt->drives())
    return make_error(wire_errc::invalid_argument, "ucx: call_sync from a callback of the same runtime; use send");
  // The outcome lives on this stack: the callback runs exactly once before this returns (a reply,
  // an error, the timer, or the link failing), and it touches `out` only while holding out->mu,
  // which this thread takes before it returns. So the callback needs no shared ownership and
  // captures one pointer (no allocation: it fits std::function's own storage).
  struct outcome {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<bool> ready{false};
    std::optional<caf::expected<reply>> result;
  } outcome_here;
  outcome* out = &outcome_here;
  reply_callback cb = [out](caf::expected<reply> r) {
    std::lock_guard lock(out->mu);
    out->result.emplace(std::move(r));
    out->ready.store(true);
    out->cv.notify_all();
  };
  auto& st = *state_;
  if (!st.open.load() || validate(req.header, req.rows.size(), rt->options.limits)) {
    send(std::move(req), timeout, std::move(cb));  // fails at once with the typed error
    return std::move(*out->result);
  }
  auto ob = std::make_unique<outbound>();
  ob->encode(frame_kind::request, req.header);
  if (rt->max_am_header != 0 && ob->header.size() > rt->max_am_header) {
    send(std::move(req), timeout, std::move(cb));
    return std::move(*out->result);
  }
  ob->batch = std::move(static_cast<token_batch&>(req));
  const auto deadline = clock::now() + timeout;

  rt->callers_driving.fetch_add(1);
  bool wants_to_drive = true;
  bool work = true;  // whether the worker has work left for the progress thread when we leave
  while (!out->ready.load()) {
    if (wants_to_drive && rt->try_drive()) {
      // noexcept for the same reason as pass(): nothing may leave while this thread holds the worker.
      [&]() noexcept {
        if (ob) state_->start(std::move(ob), std::move(cb), deadline);  // ob and cb go together, once
        idle_watch idle;
        while (!out->ready.load()) {
          if (rt->pass()) {
            idle.active();
          } else if (auto idle_for = idle.idle(); idle_for && *idle_for > rt->options.spin_awaiting) {
            wants_to_drive = false;  // a slow reply: stop burning this core, let the progress thread watch
            break;
          }
        }
      }();
      work = rt->stop_driving();
      if (!wants_to_drive) {
        rt->callers_driving.fetch_sub(1);
        rt->hand_back(work);
      }
      continue;
    }
    if (ob) {
      rt->post([s = state_, ob = std::move(ob), cb = std::move(cb), deadline]() mutable {
        s->start(std::move(ob), std::move(cb), deadline);
      });
      ob.reset();
    }
    // Someone else drives (the progress thread steps aside for us shortly, or another caller).
    work = true;
    std::unique_lock lock(out->mu);
    out->cv.wait_for(lock, wants_to_drive ? std::chrono::microseconds(20) : std::chrono::microseconds(100000),
                     [&] { return out->ready.load(); });
  }
  if (wants_to_drive) {
    rt->callers_driving.fetch_sub(1);
    rt->hand_back(work);
  }
  std::lock_guard lock(out->mu);
  return std::move(*out->result);
}

link_stats ucx_client::stats() const { return state_->counters.snapshot(); }

bool ucx_client::is_open() const { return state_->open.load(); }

void ucx_client::close() {
  auto s = state_;
  s->rt->run_sync([s] {
    const bool healthy = s->open.load();
    s->open.store(false);
    s->fail_all(make_error(wire_errc::link_closed, "ucx: the link to " + s->peer + " was closed"));
    // A healthy endpoint is flushed; a failed one can only be released (forced).
    s->teardown(!healthy && s->peer_mode);
  });
}

// ---------------------------------------------------------------------------------------------
// Server

namespace {
struct server_conn;
}

struct ucx_server::state {
  ucx_runtime::impl* rt = nullptr;
  request_handler handler;
  ucx_server_options options;
  std::optional<internal::worker_pool> pool;
  ucp_listener_h listener = nullptr;
  uint16_t port = 0;
  internal::link_counters counters;
  std::atomic<bool> stopped{false};
  std::atomic<size_t> open_conns{0};
  std::unordered_map<server_conn*, std::shared_ptr<server_conn>> conns;  // driver only
  std::weak_ptr<state> self;  // lets the listener callback hand connections a shared owner

  static void on_conn_request(ucp_conn_request_h req, void* arg) noexcept;
};

namespace {

/// Takes back a handler job's share of `awaiting` if the pool drops the job without running it.
struct awaiting_guard {
  ucx_runtime::impl* rt;
  awaiting_guard(ucx_runtime::impl* r) : rt(r) {}
  awaiting_guard(awaiting_guard&& o) noexcept : rt(std::exchange(o.rt, nullptr)) {}
  ~awaiting_guard() {
    if (rt != nullptr) rt->post([r = rt] { --r->awaiting; });
  }
};

struct server_conn final : ep_owner, std::enable_shared_from_this<server_conn> {
  ucx_runtime::impl* rt = nullptr;
  std::shared_ptr<ucx_server::state> server;  // cleared when the connection closes
  ucp_ep_h ep = nullptr;
  bool open = true;  // driver only
  internal::link_counters counters;
  batch_header inline_meta;  // driver only: the request header kept for an inline handler's reply

  struct rx_op {
    std::shared_ptr<server_conn> self;
    request req;
  };

  template <class Member>
  void bump(Member member, uint64_t n = 1) {
    internal::link_counters::bump(counters.*member, n);
    if (server) internal::link_counters::bump(server->counters.*member, n);
  }
  void count_error(const caf::error& err) {
    counters.count_error(err);
    if (server) server->counters.count_error(err);
  }

  void teardown(bool force) {
    if (ep == nullptr) return;
    rt->owners.erase(ep);
    rt->close_ep(ep, force);
    ep = nullptr;
    bump(&internal::link_counters::links_closed);
    if (server) {
      server->open_conns.fetch_sub(1);
      auto keep = shared_from_this();
      server->conns.erase(this);
      server.reset();
    }
  }

  /// Stops serving now; the endpoint is closed on the next loop turn (not inside UCX's callback).
  void close_later(bool force) {
    if (!open) return;
    open = false;
    rt->post([self = shared_from_this(), force] { self->teardown(force); });
  }

  ucs_status_t on_frame(unsigned am_id, std::span<const std::byte> header, void* data, size_t length,
                        uint64_t recv_attr) override {
    if (!open) return UCS_OK;
    bump(&internal::link_counters::bytes_received, header.size() + length);
    auto f = decode(header, length, rt->options.limits);
    caf::error bad;
    if (!f)
      bad = f.error();
    else if (am_id != am_id_request || f->kind != frame_kind::request)
      bad = make_error(wire_errc::bad_kind, std::string("ucx: a ") + to_string(f->kind) +
                                                " frame arrived where requests are expected");
    if (bad) {
      count_error(bad);  // the connection is closed: the peer's byte stream cannot be trusted
      close_later(server && server->options.peer_error_handling);
      return UCS_OK;
    }
    auto buf = row_buffer::allocate(length);
    if (!buf) {
      send_reply(f->header, buf.error());
      return UCS_OK;
    }
    request req;
    req.header = std::move(f->header);
    req.rows = std::move(*buf);
    if (!(recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {  // eager: data is valid during this callback
      if (length != 0) std::memcpy(req.rows.data(), data, length);
      dispatch(std::move(req));
      return UCS_OK;
    }
    auto* rx = new rx_op{shared_from_this(), std::move(req)};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    p.cb.recv_am = &server_conn::on_rx_done;
    p.user_data = rx;
    p.memory_type = UCS_MEMORY_TYPE_HOST;
    ucs_status_ptr_t sp = ucp_am_recv_data_nbx(rt->worker, data, rx->req.rows.data(), length, &p);
    if (sp == nullptr) {
      dispatch(std::move(rx->req));
      delete rx;
    } else if (UCS_PTR_IS_ERR(sp)) {
      count_error(make_error(wire_errc::peer_failed, "ucx: receiving rows failed: " + ucx_text(UCS_PTR_STATUS(sp))));
      delete rx;
    }
    return UCS_OK;
  }

  static void on_rx_done(void* request, ucs_status_t status, size_t /*length*/, void* user_data) noexcept {
    auto* rx = static_cast<rx_op*>(user_data);
    if (status == UCS_OK)
      rx->self->dispatch(std::move(rx->req));
    else
      rx->self->count_error(make_error(wire_errc::peer_failed, "ucx: receiving rows failed: " + ucx_text(status)));
    delete rx;
    ucp_request_free(request);
  }

  void dispatch(request req) {
    if (!open || !server) return;
    bump(&internal::link_counters::requests_received);
    auto* srv = server.get();
    if (!srv->pool) {
      // Rows go to the handler; the header stays for the reply, in a copy whose segment list keeps
      // its capacity from request to request (the handler runs inline on the driver, one at a time).
      inline_meta = req.header;
      send_reply(inline_meta, srv->handler(std::move(req)));
      return;
    }
    batch_header meta = req.header;
    ++rt->awaiting;
    srv->pool->submit([self = shared_from_this(), srv, guard = awaiting_guard{rt}, meta = std::move(meta),
                       req = std::move(req)]() mutable {
      auto r = srv->handler(std::move(req));
      guard.rt = nullptr;
      self->rt->post([self, meta = std::move(meta), r = std::move(r)]() mutable {
        --self->rt->awaiting;
        self->send_reply(meta, std::move(r));
      });
    });
  }

  void send_reply(const batch_header& meta, caf::expected<reply> r) {
    if (!open || ep == nullptr) return;
    if (r) {
      r->header.batch_id = meta.batch_id;
      r->header.epoch = meta.epoch;
      r->header.layer = meta.layer;
      caf::error bad = validate(r->header, r->rows.size(), rt->options.limits);
      if (!bad) bad = check_reply(meta, r->header);
      if (bad) r = make_error(wire_errc::handler_failed, "ucx: the handler's reply is invalid: " + describe(bad));
    }
    auto ob = std::make_unique<outbound>();
    if (r) {
      ob->encode(frame_kind::reply, r->header);
      ob->batch = std::move(static_cast<token_batch&>(*r));
      bump(&internal::link_counters::replies_sent);
    } else {
      ob->take(encode_error(meta.batch_id, meta.epoch, meta.layer, r.error()));
      bump(&internal::link_counters::errors_sent);
      count_error(r.error());
    }
    bump(&internal::link_counters::bytes_sent, ob->header.size() + ob->batch.rows.size());
    const ucs_status_t st = am_send(ep, am_id_reply, std::move(ob));
    if (UCS_STATUS_IS_ERR(st)) count_error(make_error(wire_errc::send_failed, "ucx: reply: " + ucx_text(st)));
  }

  void on_ep_error(ucs_status_t /*status*/) override {
    // The client went away (or crashed): nothing is pending on this side, just release it.
    open = false;
    rt->post([self = shared_from_this()] { self->teardown(true); });
  }
};

}  // namespace

void ucx_server::state::on_conn_request(ucp_conn_request_h req, void* arg) noexcept {
  auto* s = static_cast<state*>(arg);
  if (s->stopped.load()) {
    ucp_listener_reject(s->listener, req);
    return;
  }
  auto conn = std::make_shared<server_conn>();
  conn->rt = s->rt;
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  p.conn_request = req;
  p.err_mode = s->options.peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  p.err_handler.cb = &ucx_runtime::impl::on_ep_error;
  p.err_handler.arg = s->rt;
  if (ucp_ep_create(s->rt->worker, &p, &conn->ep) != UCS_OK) {
    s->counters.count_error(wire_errc::connect_failed);
    return;
  }
  conn->server = s->self.lock();
  s->rt->owners.emplace(conn->ep, conn);
  s->conns.emplace(conn.get(), conn);
  s->open_conns.fetch_add(1);
}

caf::expected<std::unique_ptr<ucx_server>> ucx_server::make(std::shared_ptr<ucx_runtime> runtime,
                                                             request_handler handler, ucx_server_options options) {
  if (!runtime) return make_error(wire_errc::invalid_argument, "ucx: a server needs a runtime");
  if (!handler) return make_error(wire_errc::invalid_argument, "ucx: a server needs a handler");
  auto sa = make_sockaddr(options.host, options.port);
  if (!sa) return sa.error();
  auto* rt = runtime->impl_.get();
  auto st = std::make_shared<state>();
  st->self = st;
  st->rt = rt;
  st->handler = std::move(handler);
  st->options = options;
  if (options.workers > 0) st->pool.emplace(options.workers);
  caf::error err = rt->run_sync([&]() -> caf::error {
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*sa);
    lp.sockaddr.addrlen = sizeof(sockaddr_in);
    lp.conn_handler.cb = &state::on_conn_request;
    lp.conn_handler.arg = st.get();
    ucs_status_t s = ucp_listener_create(rt->worker, &lp, &st->listener);
    if (s != UCS_OK)
      return make_error(wire_errc::ucx_error, "ucx: listening on " + options.host + ":" +
                                                  std::to_string(options.port) + ": " + ucx_text(s));
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    s = ucp_listener_query(st->listener, &la);
    if (s != UCS_OK) {
      ucp_listener_destroy(st->listener);
      st->listener = nullptr;
      return make_error(wire_errc::ucx_error, "ucx: ucp_listener_query: " + ucx_text(s));
    }
    st->port = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
    rt->listeners.fetch_add(1);
    return {};
  });
  if (err) {
    if (st->pool) st->pool->stop();
    return err;
  }
  return std::unique_ptr<ucx_server>(new ucx_server(std::move(runtime), std::move(st)));
}

ucx_server::~ucx_server() { stop(); }

uint16_t ucx_server::port() const { return state_->port; }

link_stats ucx_server::stats() const { return state_->counters.snapshot(); }

size_t ucx_server::connections() const { return state_->open_conns.load(); }

std::vector<link_stats> ucx_server::connection_stats() const {
  auto s = state_;
  return s->rt->run_sync([s] {
    std::vector<link_stats> out;
    for (auto& [ptr, conn] : s->conns) out.push_back(conn->counters.snapshot());
    return out;
  });
}

void ucx_server::stop() {
  if (state_->stopped.exchange(true)) return;
  auto s = state_;
  s->rt->run_sync([s] {
    if (s->listener != nullptr) {
      ucp_listener_destroy(s->listener);
      s->rt->listeners.fetch_sub(1);
    }
    s->listener = nullptr;
    auto conns = s->conns;
    for (auto& [ptr, conn] : conns) {
      conn->open = false;
      conn->teardown(s->options.peer_error_handling);
    }
  });
  if (s->pool) s->pool->stop();
  s->self.reset();
}

}  // namespace sy::transport
