// Single-layer KV transfer for VLLMPagedMemLayerwiseGPUConnector (lmc_ops.single_layer_kv_transfer):
// one layer of one chunk, or of a batch of chunks (blockIdx.y), in one launch, between KV_T2D
// MemoryObjs [T, 2, H*D] (MLA: [T, 1, D]) and that layer's tensor of vLLM's paged KV cache.
// Loaded at run time by lmcache/gpu_connector/cupy_kernels.py (cupy.RawModule); the shared
// device code and the addressing it implements are in paged_kv_transfer.cuh. The layer's base
// address is a kernel argument (no pointer table), so a layer costs one launch and one small
// descriptor upload.
//
// Entry points: single_layer_kv_{from,to}_paged_w{16,8,4,2,1}; w = bytes per load/store.
#include "paged_kv_transfer.cuh"

#define LMC_SINGLE_LAYER(W, VT)                                                             \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      single_layer_kv_from_paged_w##W(LMC_TRANSFER_PARAMS) {                                \
    lmc_paged_kv_transfer<VT, false, true>(LMC_TRANSFER_ARGS);                              \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      single_layer_kv_to_paged_w##W(LMC_TRANSFER_PARAMS) {                                  \
    lmc_paged_kv_transfer<VT, true, true>(LMC_TRANSFER_ARGS);                               \
  }

LMC_SINGLE_LAYER(16, uint4)
LMC_SINGLE_LAYER(8, uint2)
LMC_SINGLE_LAYER(4, unsigned int)
LMC_SINGLE_LAYER(2, unsigned short)
LMC_SINGLE_LAYER(1, unsigned char)
