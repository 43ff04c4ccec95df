#pragma once
/// Host<->device staging for the UCX data plane. Debian's UCX has no CUDA transport, so expert weights
/// and activations cross hosts through pinned host memory: the receiver lands bytes in `host()` and
/// uploads them; the sender downloads into `host()` and hands that to UCX.
///
/// This header has no CUDA includes: CPU-only translation units can hold these types. The stream is
/// an opaque `CUstream_st*`, which is what `cudaStream_t` is, so CUDA code can use it directly.
#include "model/error.hpp"

#include <cstddef>
#include <memory>

struct CUstream_st;

namespace sy::model::cuda {

/// The number of CUDA devices this process can use. 0 when there is no driver or no device
/// (cudaErrorNoDevice, cudaErrorInsufficientDriver, or only the toolkit's stub libcuda); -1 when the
/// runtime fails for another reason (a broken driver install, say), so that such a machine is not
/// mistaken for one without a GPU.
[[nodiscard]] int device_count();

/// A pinned host buffer and a device buffer of the same capacity on one device, with a stream of
/// its own. Copies are asynchronous on that stream and ordered with each other; `wait()` returns
/// once all of them have finished. Not thread-safe: one user at a time.
///
/// Every CUDA failure becomes a `caf::error` (category "model") naming the call, the device and
/// `cudaGetErrorString`: `invalid_argument` for a bad device or size, `unsupported` where there is
/// no driver or device, `io_error` otherwise (out of memory, a failed copy).
class pinned_staging {
 public:
  /// Allocates `bytes` of pinned host memory (portable: usable from every device's context) and
  /// of device memory on `device`, and creates a non-blocking stream on `device`. `bytes` may be 0:
  /// the buffers are then null until the first `grow`. Every member function leaves the calling
  /// thread's current device as it found it.
  static caf::expected<std::unique_ptr<pinned_staging>> make(int device, size_t bytes);

  /// Waits for pending copies, then frees both buffers and the stream. Errors are ignored here.
  ~pinned_staging();
  pinned_staging(const pinned_staging&) = delete;
  pinned_staging& operator=(const pinned_staging&) = delete;

  /// The pinned host buffer, `capacity()` bytes. Valid until the next successful `grow` that
  /// reallocates, or destruction. Do not touch the bytes an unfinished copy reads or writes.
  [[nodiscard]] std::byte* host() { return host_; }
  /// The device buffer on `device_id()`, `capacity()` bytes; same lifetime as `host()`.
  [[nodiscard]] void* device() { return device_ptr_; }
  [[nodiscard]] size_t capacity() const { return capacity_; }
  [[nodiscard]] int device_id() const { return device_; }
  /// The stream every copy runs on (a `cudaStream_t`), for kernels that consume the device buffer
  /// in order with the copies.
  [[nodiscard]] CUstream_st* stream() const { return stream_; }

  /// Enqueues a copy of the first `bytes` of `host()` to `device()`; returns without waiting.
  /// `bytes` > capacity() is an `invalid_argument` error and enqueues nothing.
  [[nodiscard]] caf::error upload(size_t bytes);
  /// Enqueues a copy of the first `bytes` of `device()` to `host()`; returns without waiting.
  [[nodiscard]] caf::error download(size_t bytes);
  /// Blocks until every copy enqueued so far has finished; reports a failure of any of them.
  [[nodiscard]] caf::error wait();

  /// Makes capacity() at least `bytes`. When it already is, does nothing. Otherwise waits for
  /// pending copies, allocates new buffers of exactly `bytes`, and frees the old ones: contents
  /// are not kept and earlier `host()`/`device()` pointers become invalid. If an allocation fails
  /// the old buffers stay in place, unchanged, and the error is returned.
  [[nodiscard]] caf::error grow(size_t bytes);

 private:
  pinned_staging(int device, CUstream_st* stream, std::byte* host, void* device_ptr, size_t capacity);

  int device_;
  CUstream_st* stream_;
  std::byte* host_;
  void* device_ptr_;
  size_t capacity_;
};

}  // namespace sy::model::cuda
