#include "model/cuda/staging.hpp"

#include <cuda_runtime.h>

#include <string>
#include <utility>

namespace sy::model::cuda {

namespace {

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

/// "pinned_staging: cudaHostAlloc(4096 bytes) failed on device 0: out of memory (cudaErrorMemoryAllocation)"
caf::error cuda_error(const std::string& call, cudaError_t e, int device) {
  // The error is reported here; clear the thread's last-error slot so that an unrelated later
  // cudaGetLastError() (after a kernel launch, say) does not report it again.
  (void)cudaGetLastError();
  std::string msg = "pinned_staging: " + call + " failed on device " + std::to_string(device) + ": " +
                    cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
  return make_error(errc_of(e), std::move(msg));
}

/// Makes a device current on the calling thread for a scope, then restores the one before.
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
    previous_ = current;
    return cudaSuccess;
  }

 private:
  int previous_ = -1;
};

struct buffers {
  std::byte* host = nullptr;
  void* dev = nullptr;
};

void release(buffers& b) {
  if (b.dev != nullptr) (void)cudaFree(b.dev);
  if (b.host != nullptr) (void)cudaFreeHost(b.host);
  b = {};
}

/// Allocates both buffers on the current device (which must be `device`); all or nothing.
caf::error allocate(int device, size_t bytes, buffers& out) {
  out = {};
  if (bytes == 0) return {};
  void* host = nullptr;
  if (cudaError_t e = cudaHostAlloc(&host, bytes, cudaHostAllocPortable); e != cudaSuccess)
    return cuda_error("cudaHostAlloc(" + std::to_string(bytes) + " bytes)", e, device);
  void* dev = nullptr;
  if (cudaError_t e = cudaMalloc(&dev, bytes); e != cudaSuccess) {
    (void)cudaFreeHost(host);
    return cuda_error("cudaMalloc(" + std::to_string(bytes) + " bytes)", e, device);
  }
  out.host = static_cast<std::byte*>(host);
  out.dev = dev;
  return {};
}

}  // namespace

int device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess) return n;
  (void)cudaGetLastError();
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorStubLibrary) return 0;
  return -1;
}

pinned_staging::pinned_staging(int device, CUstream_st* stream, std::byte* host, void* device_ptr, size_t capacity)
    : device_(device), stream_(stream), host_(host), device_ptr_(device_ptr), capacity_(capacity) {}

caf::expected<std::unique_ptr<pinned_staging>> pinned_staging::make(int device, size_t bytes) {
  if (device < 0)
    return make_error(model_errc::invalid_argument, "pinned_staging: device " + std::to_string(device) + " is negative");
  device_scope scope;
  if (cudaError_t e = scope.enter(device); e != cudaSuccess) return cuda_error("cudaSetDevice", e, device);
  cudaStream_t stream = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess)
    return cuda_error("cudaStreamCreateWithFlags", e, device);
  buffers b;
  if (auto err = allocate(device, bytes, b)) {
    (void)cudaStreamDestroy(stream);
    return err;
  }
  return std::unique_ptr<pinned_staging>(new pinned_staging(device, stream, b.host, b.dev, bytes));
}

pinned_staging::~pinned_staging() {
  device_scope scope;
  (void)scope.enter(device_);
  (void)cudaStreamSynchronize(stream_);
  buffers b{host_, device_ptr_};
  release(b);
  (void)cudaStreamDestroy(stream_);
}

caf::error pinned_staging::upload(size_t bytes) {
  if (bytes > capacity_)
    return make_error(model_errc::invalid_argument, "pinned_staging: upload of " + std::to_string(bytes) +
                                                        " bytes exceeds the capacity of " + std::to_string(capacity_));
  if (bytes == 0) return {};
  device_scope scope;
  if (cudaError_t e = scope.enter(device_); e != cudaSuccess) return cuda_error("cudaSetDevice", e, device_);
  if (cudaError_t e = cudaMemcpyAsync(device_ptr_, host_, bytes, cudaMemcpyHostToDevice, stream_); e != cudaSuccess)
    return cuda_error("cudaMemcpyAsync(host to device, " + std::to_string(bytes) + " bytes)", e, device_);
  return {};
}

caf::error pinned_staging::download(size_t bytes) {
  if (bytes > capacity_)
    return make_error(model_errc::invalid_argument, "pinned_staging: download of " + std::to_string(bytes) +
                                                        " bytes exceeds the capacity of " + std::to_string(capacity_));
  if (bytes == 0) return {};
  device_scope scope;
  if (cudaError_t e = scope.enter(device_); e != cudaSuccess) return cuda_error("cudaSetDevice", e, device_);
  if (cudaError_t e = cudaMemcpyAsync(host_, device_ptr_, bytes, cudaMemcpyDeviceToHost, stream_); e != cudaSuccess)
    return cuda_error("cudaMemcpyAsync(device to host, " + std::to_string(bytes) + " bytes)", e, device_);
  return {};
}

caf::error pinned_staging::wait() {
  device_scope scope;
  if (cudaError_t e = scope.enter(device_); e != cudaSuccess) return cuda_error("cudaSetDevice", e, device_);
  if (cudaError_t e = cudaStreamSynchronize(stream_); e != cudaSuccess)
    return cuda_error("cudaStreamSynchronize", e, device_);
  return {};
}

caf::error pinned_staging::grow(size_t bytes) {
  if (bytes <= capacity_) return {};
  device_scope scope;
  if (cudaError_t e = scope.enter(device_); e != cudaSuccess) return cuda_error("cudaSetDevice", e, device_);
  // Pending copies still read or write the old buffers.
  if (cudaError_t e = cudaStreamSynchronize(stream_); e != cudaSuccess)
    return cuda_error("cudaStreamSynchronize", e, device_);
  buffers fresh;
  if (auto err = allocate(device_, bytes, fresh)) return err;
  buffers old{host_, device_ptr_};
  release(old);
  host_ = fresh.host;
  device_ptr_ = fresh.dev;
  capacity_ = bytes;
  return {};
}

}  // namespace sy::model::cuda
