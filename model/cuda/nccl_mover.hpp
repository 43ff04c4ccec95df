#pragma once
/// Expert weight transfer between the GPUs of one host with NCCL point-to-point, guarded by a
/// watchdog: a peer that dies or never posts its half of a transfer costs at most the mover's
/// timeout, never a hung host.
///
/// This header has no CUDA or NCCL includes: CPU-only translation units can hold these types. The
/// communicator and the stream are opaque pointers (`ncclComm_t` is `ncclComm*`, `cudaStream_t` is
/// `CUstream_st*`).
#include "model/error.hpp"

#include <array>
#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>

struct CUstream_st;
struct ncclComm;

namespace sy::model::cuda {

/// One rank of a non-blocking NCCL communicator, bound to one device, with its own stream.
///
/// Every call that talks to peers (creation, `send_expert`, `recv_expert`) returns within about
/// the mover's timeout. When an operation fails or misses its deadline the mover calls
/// `ncclCommAbort`, which cancels whatever the communicator still has in flight (kernels waiting
/// for a peer included), and from then on every transfer fails at once with an error that says
/// "aborted" and why. An aborted mover cannot be repaired: build a new communicator (a new unique
/// id, every rank again).
///
/// Not thread-safe: one thread uses a mover at a time. Ranks of one communicator live in different
/// threads or processes (one mover per device), since each call blocks until its peer has done
/// its half.
///
/// Errors: `invalid_argument` for inconsistent arguments (checked before NCCL is touched; the
/// mover stays usable), `unsupported` where NCCL or CUDA finds no usable device, `io_error` for
/// failures, timeouts and use after an abort.
class nccl_mover {
 public:
  /// A fresh NCCL unique id (ncclGetUniqueId) for rank 0 to hand to every rank out of band.
  static caf::expected<std::array<char, 128>> new_unique_id();

  /// Joins communicator `unique_id_bytes` as `rank` of `nranks` on `device`: creates a
  /// non-blocking stream on `device` and a non-blocking communicator (ncclCommInitRankConfig with
  /// blocking = 0), then polls until every rank has joined. All `nranks` ranks must call this
  /// concurrently with the same id. If they have not all joined within `timeout`, the half-built
  /// communicator is aborted and an error returned. `timeout` (> 0) also bounds each later
  /// transfer and the destructor's finalize until `set_timeout` changes it. Initialisation takes
  /// long (on two H200s, more than 300 ms), so give it seconds and set a tighter transfer bound
  /// afterwards. The calling thread's current device is left as it was.
  static caf::expected<std::unique_ptr<nccl_mover>> make(int device, int rank, int nranks,
                                                        const std::array<char, 128>& unique_id_bytes,
                                                        std::chrono::milliseconds timeout);

  /// Healthy: ncclCommFinalize, polled until the communicator is quiescent, then ncclCommDestroy.
  /// Finalizing is an intra-host collective (NCCL waits for the other ranks of this host to
  /// finalize too): destroy the movers of one communicator together. If finalizing fails or takes
  /// longer than the timeout (a peer already aborted, or never destroys its mover), the
  /// communicator is aborted instead. Already aborted: only the stream is released.
  ~nccl_mover();
  nccl_mover(const nccl_mover&) = delete;
  nccl_mover& operator=(const nccl_mover&) = delete;

  /// Sends an expert's matrices to `peer`: `buffers[i]` (device memory on `device()`) holds
  /// `bytes[i]` bytes, sent as ncclUint8 in one ncclGroupStart/ncclGroupEnd on the mover's
  /// stream. `peer` must call `recv_expert(rank(), ...)` with the same sizes in the same order.
  /// The buffers must be ready when called (work that writes them finished, or ordered before
  /// this call on the host). Returns once the data has left the buffers (they may be reused), or
  /// with an error after which the mover is aborted: on an NCCL or CUDA failure, or when the
  /// transfer has not completed within the timeout. The error names the peer, the bytes and why.
  /// Zero-byte entries are skipped, on both sides.
  [[nodiscard]] caf::error send_expert(int peer, std::span<const void* const> buffers,
                                       std::span<const size_t> bytes);
  /// Receives what `peer` sends with `send_expert(rank(), ...)` into `buffers[i]` (device memory
  /// on `device()`, `bytes[i]` bytes each). Returns once all the bytes have landed (visible to any
  /// later work on the device), or with an error as for `send_expert`; after an error the buffers'
  /// contents are undefined.
  [[nodiscard]] caf::error recv_expert(int peer, std::span<void* const> buffers, std::span<const size_t> bytes);

  [[nodiscard]] int device() const { return device_; }
  [[nodiscard]] int rank() const { return rank_; }
  [[nodiscard]] int nranks() const { return nranks_; }
  /// The bound on each transfer (and on the destructor's finalize).
  [[nodiscard]] std::chrono::milliseconds timeout() const { return timeout_; }
  /// Changes that bound for later calls; values <= 0 are ignored. The first transfer with a peer
  /// also sets up NCCL's connection to it, which takes longer than later ones.
  void set_timeout(std::chrono::milliseconds timeout) {
    if (timeout.count() > 0) timeout_ = timeout;
  }
  /// True once the communicator has been aborted; every later transfer fails.
  [[nodiscard]] bool aborted() const { return comm_ == nullptr; }
  /// Why the communicator was aborted (the first failure's message); empty while healthy.
  [[nodiscard]] const std::string& abort_reason() const { return abort_reason_; }

 private:
  nccl_mover(int device, int rank, int nranks, std::chrono::milliseconds timeout, ncclComm* comm,
             CUstream_st* stream);

  /// Posts the group (sends or receives of `count` buffers), then waits with the watchdog.
  caf::error transfer(bool send, int peer, const void* const* buffers, size_t count, std::span<const size_t> bytes);
  /// Aborts the communicator and keeps `reason` for later calls.
  void abort(std::string reason);

  int device_;
  int rank_;
  int nranks_;
  std::chrono::milliseconds timeout_;
  ncclComm* comm_;  ///< null once aborted
  CUstream_st* stream_;
  std::string abort_reason_;
};

/// The plain device-to-device baseline the NCCL transfer is compared with: cudaMemcpyPeer of
/// `bytes` from `src` on `src_device` to `dst` on `dst_device`, then a wait for it on the legacy
/// default stream of `src_device` (cudaMemcpyPeer runs there, ordered after pending work on both
/// devices' legacy streams), so that the bytes have landed when this returns. Peer access is not
/// enabled here (see `enable_peer_access`); without it the driver may stage through host memory.
[[nodiscard]] caf::error copy_peer(int src_device, const void* src, int dst_device, void* dst, size_t bytes);

/// Enables direct access between `device_a` and `device_b` in both directions where the hardware
/// can (cudaDeviceCanAccessPeer); "already enabled" counts as success. `unsupported` when the pair
/// cannot access each other directly. Process-wide and permanent for the two contexts.
[[nodiscard]] caf::error enable_peer_access(int device_a, int device_b);

}  // namespace sy::model::cuda
