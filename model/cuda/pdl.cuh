#pragma once
/// Programmatic dependent launch (compute capability 9.0 on), device side, for the kernels of both
/// CUDA libraries: a kernel launched with the attribute may start while the previous kernel on the
/// stream drains; `pdl_wait` blocks until that kernel has completed and its writes are visible,
/// `pdl_trigger` lets the next kernel launch once every block of this one ran it. Both are no-ops
/// for a kernel launched without the attribute, and compiled out below 9.0 (launch such code
/// without the attribute: it would not wait).

namespace sy::model::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace sy::model::cuda
