#include "model/cuda/nccl_mover.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

namespace sy::model::cuda {

static_assert(sizeof(ncclUniqueId) == std::tuple_size_v<std::array<char, 128>>,
              "ncclUniqueId is NCCL_UNIQUE_ID_BYTES (128) bytes");

namespace {

using clock_type = std::chrono::steady_clock;

model_errc errc_of(cudaError_t e) {
  switch (e) {
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidDevicePointer:
      return model_errc::invalid_argument;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
      return model_errc::unsupported;
    default:
      return model_errc::io_error;
  }
}

/// "<who>: <call> failed on device N: <cudaGetErrorString> (<cudaGetErrorName>)"
caf::error cuda_error(const std::string& who, const std::string& call, cudaError_t e, int device) {
  // Reported here; clear the thread's last-error slot so a later unrelated check does not see it.
  (void)cudaGetLastError();
  return make_error(errc_of(e), who + ": " + call + " failed on device " + std::to_string(device) + ": " +
                                    cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")");
}

/// "<ncclGetErrorString>: <ncclGetLastError>" (the second only when NCCL kept a message).
std::string nccl_reason(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') {
    s += ": ";
    s += last;
  }
  return s;
}

std::string ms_text(std::chrono::milliseconds ms) { return std::to_string(ms.count()) + " ms"; }

/// Makes devices current on the calling thread for a scope, then restores the one before the
/// first `enter`.
class device_scope {
 public:
  device_scope() = default;
  device_scope(const device_scope&) = delete;
  device_scope& operator=(const device_scope&) = delete;
  ~device_scope() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  cudaError_t enter(int device) {
    int current = -1;
    if (cudaError_t e = cudaGetDevice(&current); e != cudaSuccess) return e;
    if (current == device) return cudaSuccess;
    if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return e;
    if (previous_ < 0) previous_ = current;
    return cudaSuccess;
  }

 private:
  int previous_ = -1;
};

/// Pauses between polls: 20 µs at first, doubling up to 1 ms. Short transfers are not lengthened
/// by a whole millisecond; long ones (and waits for a dead peer) cost ~1000 cheap polls a second.
class backoff {
 public:
  void pause() {
    std::this_thread::sleep_for(delay_);
    delay_ = std::min(delay_ * 2, std::chrono::microseconds(1000));
  }

 private:
  std::chrono::microseconds delay_{20};
};

/// Polls ncclCommGetAsyncError until the communicator leaves ncclInProgress or `deadline` passes.
/// Returns ncclInProgress on timeout.
ncclResult_t poll_ready(ncclComm_t comm, clock_type::time_point deadline) {
  backoff wait;
  for (;;) {
    ncclResult_t state = ncclInProgress;
    if (ncclResult_t q = ncclCommGetAsyncError(comm, &state); q != ncclSuccess) return q;
    if (state != ncclInProgress) return state;
    if (clock_type::now() >= deadline) return ncclInProgress;
    wait.pause();
  }
}

}  // namespace

caf::expected<std::array<char, 128>> nccl_mover::new_unique_id() {
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
    return make_error(model_errc::io_error, "nccl_mover: ncclGetUniqueId failed: " + nccl_reason(r, nullptr));
  std::array<char, 128> out;
  std::memcpy(out.data(), id.internal, out.size());
  return out;
}

nccl_mover::nccl_mover(int device, int rank, int nranks, std::chrono::milliseconds timeout, ncclComm* comm,
                       CUstream_st* stream)
    : device_(device), rank_(rank), nranks_(nranks), timeout_(timeout), comm_(comm), stream_(stream) {}

caf::expected<std::unique_ptr<nccl_mover>> nccl_mover::make(int device, int rank, int nranks,
                                                            const std::array<char, 128>& unique_id_bytes,
                                                            std::chrono::milliseconds timeout) {
  const std::string who = "nccl_mover rank " + std::to_string(rank) + " of " + std::to_string(nranks) +
                          " on device " + std::to_string(device);
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return make_error(model_errc::invalid_argument, who + ": rank must lie in [0, nranks)");
  if (device < 0) return make_error(model_errc::invalid_argument, who + ": the device is negative");
  if (timeout.count() <= 0) return make_error(model_errc::invalid_argument, who + ": the timeout must be positive");

  device_scope scope;
  if (cudaError_t e = scope.enter(device); e != cudaSuccess) return cuda_error(who, "cudaSetDevice", e, device);
  cudaStream_t stream = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess)
    return cuda_error(who, "cudaStreamCreateWithFlags", e, device);

  ncclUniqueId id;
  std::memcpy(id.internal, unique_id_bytes.data(), sizeof id.internal);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const auto deadline = clock_type::now() + timeout;
  ncclResult_t r = ncclCommInitRankConfig(&comm, nranks, id, rank, &config);
  if ((r != ncclSuccess && r != ncclInProgress) || comm == nullptr) {
    std::string why = nccl_reason(r, comm);
    if (comm != nullptr) (void)ncclCommAbort(comm);
    (void)cudaStreamDestroy(stream);
    model_errc code = (r == ncclInvalidArgument || r == ncclInvalidUsage) ? model_errc::invalid_argument
                                                                          : model_errc::io_error;
    return make_error(code, who + ": ncclCommInitRankConfig failed: " + why);
  }
  r = poll_ready(comm, deadline);
  if (r != ncclSuccess) {
    std::string why = r == ncclInProgress
                          ? "not all " + std::to_string(nranks) + " ranks joined within the " + ms_text(timeout) +
                                " timeout"
                          : "initialisation failed: " + nccl_reason(r, comm);
    (void)ncclCommAbort(comm);
    (void)cudaStreamDestroy(stream);
    return make_error(model_errc::io_error, who + ": " + why + "; communicator aborted");
  }
  return std::unique_ptr<nccl_mover>(new nccl_mover(device, rank, nranks, timeout, comm, stream));
}

nccl_mover::~nccl_mover() {
  device_scope scope;
  (void)scope.enter(device_);
  if (comm_ != nullptr) {
    const auto deadline = clock_type::now() + timeout_;
    bool quiescent = false;
    // Non-blocking: Finalize returns at once (ncclInProgress); the communicator reports
    // ncclSuccess once every rank of this host has finalized and its work is flushed.
    if (ncclResult_t r = ncclCommFinalize(comm_); r == ncclSuccess || r == ncclInProgress)
      quiescent = poll_ready(comm_, deadline) == ncclSuccess;
    if (quiescent)
      (void)ncclCommDestroy(comm_);
    else
      (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

void nccl_mover::abort(std::string reason) {
  if (comm_ == nullptr) return;
  device_scope scope;
  (void)scope.enter(device_);
  (void)ncclCommAbort(comm_);
  comm_ = nullptr;
  abort_reason_ = std::move(reason);
  // The abort flag makes NCCL's kernels still on our stream return; wait (bounded) so that the
  // caller's buffers are no longer in use when the error reaches it.
  const auto deadline = clock_type::now() + timeout_;
  backoff wait;
  while (cudaStreamQuery(stream_) == cudaErrorNotReady && clock_type::now() < deadline) wait.pause();
  (void)cudaGetLastError();
}

caf::error nccl_mover::send_expert(int peer, std::span<const void* const> buffers, std::span<const size_t> bytes) {
  return transfer(true, peer, buffers.data(), buffers.size(), bytes);
}

caf::error nccl_mover::recv_expert(int peer, std::span<void* const> buffers, std::span<const size_t> bytes) {
  return transfer(false, peer, buffers.data(), buffers.size(), bytes);
}

caf::error nccl_mover::transfer(bool send, int peer, const void* const* buffers, size_t count,
                                std::span<const size_t> bytes) {
  const std::string who = "nccl_mover rank " + std::to_string(rank_) + " on device " + std::to_string(device_) +
                          ": " + (send ? "send_expert to peer " : "recv_expert from peer ") + std::to_string(peer);
  if (comm_ == nullptr)
    return make_error(model_errc::io_error,
                      who + ": the communicator was aborted earlier (" + abort_reason_ + "); build a new one");
  if (count != bytes.size())
    return make_error(model_errc::invalid_argument, who + ": " + std::to_string(count) + " buffers but " +
                                                        std::to_string(bytes.size()) + " sizes");
  if (peer < 0 || peer >= nranks_ || peer == rank_)
    return make_error(model_errc::invalid_argument,
                      who + ": the peer must be another rank in [0, " + std::to_string(nranks_) + ")");
  size_t total = 0;
  size_t parts = 0;
  for (size_t i = 0; i < count; ++i) {
    if (bytes[i] == 0) continue;
    if (buffers[i] == nullptr)
      return make_error(model_errc::invalid_argument, who + ": buffer " + std::to_string(i) + " is null");
    total += bytes[i];
    ++parts;
  }
  if (total == 0) return {};
  const std::string what = who + " (" + std::to_string(total) + " bytes in " + std::to_string(parts) + " buffers)";

  device_scope scope;
  if (cudaError_t e = scope.enter(device_); e != cudaSuccess) return cuda_error(what, "cudaSetDevice", e, device_);

  auto fail = [&](std::string why) {
    std::string message = what + ": " + why;
    abort(message);
    return make_error(model_errc::io_error, message + "; communicator aborted");
  };

  const auto deadline = clock_type::now() + timeout_;
  if (ncclResult_t r = ncclGroupStart(); r != ncclSuccess) return fail("ncclGroupStart failed: " + nccl_reason(r, comm_));
  ncclResult_t posted = ncclSuccess;
  for (size_t i = 0; i < count && (posted == ncclSuccess || posted == ncclInProgress); ++i) {
    if (bytes[i] == 0) continue;
    posted = send ? ncclSend(buffers[i], bytes[i], ncclUint8, peer, comm_, stream_)
                  : ncclRecv(const_cast<void*>(buffers[i]), bytes[i], ncclUint8, peer, comm_, stream_);
  }
  // Always close the group: the group depth is per thread and would outlive this call otherwise.
  ncclResult_t ended = ncclGroupEnd();
  if (posted != ncclSuccess && posted != ncclInProgress)
    return fail(std::string(send ? "ncclSend" : "ncclRecv") + " failed: " + nccl_reason(posted, comm_));
  if (ended != ncclSuccess && ended != ncclInProgress)
    return fail("ncclGroupEnd failed: " + nccl_reason(ended, comm_));

  // Watchdog. Non-blocking NCCL may still be connecting to the peer after ncclGroupEnd
  // (ncclInProgress); once the communicator reports ncclSuccess the kernels are on our stream.
  backoff wait;
  bool enqueued = false;
  for (;;) {
    ncclResult_t state = ncclInProgress;
    if (ncclResult_t q = ncclCommGetAsyncError(comm_, &state); q != ncclSuccess)
      return fail("ncclCommGetAsyncError failed: " + nccl_reason(q, comm_));
    if (state != ncclSuccess && state != ncclInProgress)
      return fail("NCCL reported an error: " + nccl_reason(state, comm_));
    if (state == ncclSuccess) {
      enqueued = true;
      cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return {};
      if (e != cudaErrorNotReady) {
        std::string why = std::string("the stream failed: ") + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
        (void)cudaGetLastError();
        return fail(std::move(why));
      }
    }
    if (clock_type::now() >= deadline)
      return fail("not complete within the " + ms_text(timeout_) + " timeout (" +
                  (enqueued ? "transfer posted, the peer has not done its half"
                            : "NCCL still connecting to the peer, which has not posted its half") +
                  ")");
    wait.pause();
  }
}

caf::error copy_peer(int src_device, const void* src, int dst_device, void* dst, size_t bytes) {
  const std::string who = "copy_peer from device " + std::to_string(src_device) + " to device " +
                          std::to_string(dst_device) + " (" + std::to_string(bytes) + " bytes)";
  if (bytes == 0) return {};
  if (src == nullptr || dst == nullptr) return make_error(model_errc::invalid_argument, who + ": null pointer");
  device_scope scope;
  if (cudaError_t e = scope.enter(src_device); e != cudaSuccess) return cuda_error(who, "cudaSetDevice", e, src_device);
  if (cudaError_t e = cudaMemcpyPeer(dst, dst_device, src, src_device, bytes); e != cudaSuccess)
    return cuda_error(who, "cudaMemcpyPeer", e, src_device);
  if (cudaError_t e = cudaStreamSynchronize(cudaStreamLegacy); e != cudaSuccess)
    return cuda_error(who, "cudaStreamSynchronize(cudaStreamLegacy)", e, src_device);
  return {};
}

caf::error enable_peer_access(int device_a, int device_b) {
  const std::string who = "enable_peer_access between devices " + std::to_string(device_a) + " and " +
                          std::to_string(device_b);
  if (device_a == device_b) return {};
  device_scope scope;
  const int pairs[2][2] = {{device_a, device_b}, {device_b, device_a}};
  for (const auto& pair : pairs) {
    const int from = pair[0];
    const int to = pair[1];
    int can = 0;
    if (cudaError_t e = cudaDeviceCanAccessPeer(&can, from, to); e != cudaSuccess)
      return cuda_error(who, "cudaDeviceCanAccessPeer", e, from);
    if (can == 0)
      return make_error(model_errc::unsupported, who + ": device " + std::to_string(from) +
                                                     " cannot access device " + std::to_string(to) + " directly");
    if (cudaError_t e = scope.enter(from); e != cudaSuccess) return cuda_error(who, "cudaSetDevice", e, from);
    cudaError_t e = cudaDeviceEnablePeerAccess(to, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();
      continue;
    }
    if (e != cudaSuccess) return cuda_error(who, "cudaDeviceEnablePeerAccess", e, from);
  }
  return {};
}

}  // namespace sy::model::cuda
