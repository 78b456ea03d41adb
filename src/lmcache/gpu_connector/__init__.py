"""GPU connectors: move KV between the serving engine's paged KV cache and MemoryObjs.

Modules: ``kv_layout`` (KVCacheLayout), ``kv_transfer`` (torch reference gather/scatter),
``base`` (GPUConnectorInterface), ``vllm_paged`` (VLLMPagedMemGPUConnectorV2, CuPy kernels on CUDA),
``paged_torch`` (its torch path and reference).
"""
