// Multi-layer KV transfer for VLLMPagedMemGPUConnectorV2 (lmc_ops.multi_layer_kv_transfer):
// all layers of one chunk, or of a batch of chunks (blockIdx.y), in one launch, between
// KV_2LTD MemoryObjs [2, L, T, H*D] (KV_MLA_FMT [1, L, T, D]) and vLLM's paged KV cache.
// Loaded at run time by lmcache/gpu_connector/cupy_kernels.py (cupy.RawModule); the shared
// device code and the addressing it implements are in paged_kv_transfer.cuh.
//
// Entry points: multi_layer_kv_{from,to}_paged_w{16,8,4,2,1}; w = bytes per load/store (the
// host picks the widest that divides every pointer, stride and head size).
#include "paged_kv_transfer.cuh"

#define LMC_MULTI_LAYER(W, VT)                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      multi_layer_kv_from_paged_w##W(LMC_TRANSFER_PARAMS) {                                 \
    lmc_paged_kv_transfer<VT, false, false>(LMC_TRANSFER_ARGS);                             \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      multi_layer_kv_to_paged_w##W(LMC_TRANSFER_PARAMS) {                                   \
    lmc_paged_kv_transfer<VT, true, false>(LMC_TRANSFER_ARGS);                              \
  }

LMC_MULTI_LAYER(16, uint4)
LMC_MULTI_LAYER(8, uint2)
LMC_MULTI_LAYER(4, unsigned int)
LMC_MULTI_LAYER(2, unsigned short)
LMC_MULTI_LAYER(1, unsigned char)
