// Programmatic dependent launch (PDL, compute capability 9.0): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may have its thread blocks scheduled while
// the kernel before it on the stream is still running, once every block of that kernel has
// executed GridDependentsLaunch (or exited). It must then call GridDependencyWait before it
// touches anything the previous kernel writes; what that kernel does not write (weights, pooled
// K/V) it may read before. This hides the launch, the previous kernel's tail and the ramp of
// the next one's loads: what separates the many short kernels of a decode step. In a CUDA graph
// capture the attribute becomes a programmatic edge.
//
// Rules for a kernel that takes part in a chain:
//   - every thread block executes GridDependencyWait before its first access to data that an
//     earlier kernel writes, and before it writes anything an earlier kernel reads (a block that
//     exits without touching either may skip it);
//   - GridDependentsLaunch may come first thing: the next kernel still waits for this one to
//     complete and its writes to be visible before it reads them, and as no kernel completes
//     before its own wait returns, a chain waits transitively for all kernels before it.
// Without the launch attribute both instructions return at once, so a kernel written this way
// runs unchanged when launched as usual.
//
// Thread-safety: LaunchKernel as cudaLaunchKernelEx (per stream).
#ifndef TOKENLAKE_ATTENTION_CUDA_PDL_CUH_
#define TOKENLAKE_ATTENTION_CUDA_PDL_CUH_

#include <cuda_runtime.h>

#include <cstddef>

namespace tokenlake::attention::cuda {

// Blocks until the grids this one depends on programmatically have completed and their memory
// is visible (returns at once when the grid was launched without PDL).
__device__ __forceinline__ void GridDependencyWait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
// This thread block no longer holds back the launch of a PDL-launched next grid.
__device__ __forceinline__ void GridDependentsLaunch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), with the PDL launch attribute when
// `pdl`. Returns the launch's error (cudaLaunchKernelEx).
template <typename... Params, typename... Args>
cudaError_t LaunchKernel(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block,
                         size_t shared_bytes, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace tokenlake::attention::cuda

#endif  // TOKENLAKE_ATTENTION_CUDA_PDL_CUH_
