// Shared device code of the paged-KV transfer kernels (csrc/vllm_paged.cu, csrc/vllm_layerwise.cu).
//
// Moves KV between vLLM's paged KV cache (one tensor per layer, device memory) and lmcache
// MemoryObj buffers (pinned host memory reached through its UVA-mapped pointer, or device
// memory), for every layout of DESIGN.md section 4.6, described by four byte strides:
//
//   element (slot s, kv k, head h, byte c of the head) of layer l sits at
//     layer_base[l] + (s / N) * block_stride + (s % N) * tok_stride + h * head_stride
//                   + k * kv_stride + c
//
//   flash_packed [B, H, N, 2D]: block = H*N*2D*e, head = N*2D*e, tok = 2D*e, kv = D*e
//   cpu_packed   [B, H, N, 2D] read per page as [2N, D]: tok = D*e, kv = N*D*e
//   legacy_5d    [2, B, N, H, D]: kv = B*N*H*D*e, block = N*H*D*e, tok = H*D*e, head = D*e
//   mla          [B, N, D]: block = N*D*e, tok = D*e, head = kv = 0 (H = 1, one "kv")
//
// (the host computes them from the tensor's real strides, so views into one big buffer work).
//
// The MemoryObj side of chunk c is addressed as
//     obj_ptr + l * obj_l_stride + k * obj_k_stride + t * obj_t_stride + h * head_bytes + c
// which covers KV_2LTD [2, L, T, H*D] (and KV_MLA_FMT [1, L, T, D]) and KV_T2D [T, 2, H*D].
//
// Semantics (the torch reference, lmcache/gpu_connector/kv_transfer.py): token t uses
// slot_mapping[slot_index0 + t]; gathering a slot < 0 writes zeros, scattering it is skipped; a
// slot >= num_slots is never dereferenced: it is skipped (gather writes zeros) and error_flag[0] is
// set to 1 so that the host raises; a gather that met a slot < 0 sets error_flag[1] (the store
// path rejects padding). Both flags are plain stores of 1 into mapped pinned host memory. Data move as raw bytes (VecT words of 16, 8, 4, 2 or 1 bytes),
// so the result is bit-exact for every dtype.
//
// Thread mapping: threadIdx.x walks the H*D bytes of one token row (in VecT words: the MemoryObj
// side is contiguous there, so a warp writes or reads 512 contiguous bytes of host memory),
// threadIdx.y and ROWS_PER_THREAD rows per thread give several independent 16-byte loads in flight
// before the first store (PCIe latency is microseconds). blockIdx.y is the chunk.
#pragma once

#ifndef LMC_ROWS_PER_THREAD  // rows (independent 16-byte loads) per thread; -D to tune
#define LMC_ROWS_PER_THREAD 4
#endif

// Per-chunk descriptor: 6 int64 values, in this order.
#define LMC_DESC_OBJ_PTR 0      // byte address of the chunk's MemoryObj as the device sees it
#define LMC_DESC_SLOT0 1        // index into slot_mapping of the chunk's first token
#define LMC_DESC_NTOK 2         // tokens of the chunk
#define LMC_DESC_OBJ_L 3        // byte stride of a layer in the MemoryObj
#define LMC_DESC_OBJ_K 4        // byte stride of K -> V in the MemoryObj
#define LMC_DESC_OBJ_T 5        // byte stride of a token in the MemoryObj
#define LMC_DESC_WORDS 6

#ifndef LMC_L2_PREFETCH  // 0, 128 or 256: L2 prefetch-size hint on 16-byte loads; -D to tune
#define LMC_L2_PREFETCH 0
#endif

// Streaming load (evict-first): the data is touched once.
template <typename VecT>
__device__ __forceinline__ VecT lmc_load(const VecT* p) { return __ldcs(p); }
#if LMC_L2_PREFETCH == 256 || LMC_L2_PREFETCH == 128
template <>
__device__ __forceinline__ uint4 lmc_load<uint4>(const uint4* p) {
  uint4 v;
#if LMC_L2_PREFETCH == 256
  asm("ld.global.cs.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
  asm("ld.global.cs.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#endif
  return v;
}
#endif

template <typename VecT>
__device__ __forceinline__ VecT lmc_zero();
template <> __device__ __forceinline__ uint4 lmc_zero<uint4>() { return make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ uint2 lmc_zero<uint2>() { return make_uint2(0, 0); }
template <> __device__ __forceinline__ unsigned int lmc_zero<unsigned int>() { return 0u; }
template <> __device__ __forceinline__ unsigned short lmc_zero<unsigned short>() { return 0; }
template <> __device__ __forceinline__ unsigned char lmc_zero<unsigned char>() { return 0; }

// Generic transfer. TO_PAGED: MemoryObj -> paged cache (retrieve); else paged -> MemoryObj (store).
// SINGLE_LAYER: the only layer's base is `single_layer_base` (layerwise path, no pointer table).
template <typename VecT, bool TO_PAGED, bool SINGLE_LAYER>
__device__ __forceinline__ void lmc_paged_kv_transfer(
    const unsigned long long* __restrict__ layer_bases,  // [num_layers] byte addresses (unless SINGLE_LAYER)
    unsigned long long single_layer_base,
    const long long* __restrict__ chunk_desc,            // [num_chunks, LMC_DESC_WORDS]
    const long long* __restrict__ slot_mapping,          // int64 slots (device memory)
    int* __restrict__ error_flag,                        // mapped host int[2], see below
    long long num_slots,                                 // valid slots are [0, num_slots)
    long long block_stride, long long tok_stride, long long head_stride, long long kv_stride,
    int block_size, int num_layers, int num_kv, int words_per_head, int words_per_row) {
  const long long* desc = chunk_desc + (long long)blockIdx.y * LMC_DESC_WORDS;
  char* const obj = reinterpret_cast<char*>(desc[LMC_DESC_OBJ_PTR]);
  const long long slot0 = desc[LMC_DESC_SLOT0];
  const int ntok = static_cast<int>(desc[LMC_DESC_NTOK]);
  const long long obj_l = desc[LMC_DESC_OBJ_L];
  const long long obj_k = desc[LMC_DESC_OBJ_K];
  const long long obj_t = desc[LMC_DESC_OBJ_T];
  // rows = (layer, kv, token), token fastest; the host keeps num_rows < 2^31.
  const int num_rows = num_layers * num_kv * ntok;
  const int rows_per_iter = blockDim.y * LMC_ROWS_PER_THREAD;

  for (int w = threadIdx.x; w < words_per_row; w += blockDim.x) {
    const int h = w / words_per_head;
    const long long col_obj = (long long)w * sizeof(VecT);  // == h*head_bytes + (w%wph)*sizeof
    const long long col_paged = (long long)h * head_stride + (long long)(w - h * words_per_head) * sizeof(VecT);
    for (int base = blockIdx.x * rows_per_iter; base < num_rows; base += gridDim.x * rows_per_iter) {
      VecT buf[LMC_ROWS_PER_THREAD];
      char* dst[LMC_ROWS_PER_THREAD];
#pragma unroll
      for (int u = 0; u < LMC_ROWS_PER_THREAD; ++u) {
        dst[u] = nullptr;
        const int r = base + u * (int)blockDim.y + (int)threadIdx.y;
        if (r >= num_rows) continue;
        const int t = r % ntok;
        const int q = r / ntok;
        const int k = q % num_kv;
        const int l = q / num_kv;
        const long long slot = slot_mapping[slot0 + t];
        const bool bad = slot >= num_slots;
        if (bad) error_flag[0] = 1;
        if (!TO_PAGED && slot < 0) error_flag[1] = 1;  // padding gathered as zeros
        const bool valid = slot >= 0 && !bad;
        char* const obj_addr = obj + l * obj_l + k * obj_k + (long long)t * obj_t + col_obj;
        char* paged_addr = nullptr;
        if (valid) {
          const unsigned long long lb = SINGLE_LAYER ? single_layer_base : layer_bases[l];
          const long long blk = slot / block_size;
          const long long off = slot - blk * block_size;
          paged_addr = reinterpret_cast<char*>(lb) + blk * block_stride + off * tok_stride +
                       (long long)k * kv_stride + col_paged;
        }
        if (TO_PAGED) {
          if (valid) {
            buf[u] = lmc_load(reinterpret_cast<const VecT*>(obj_addr));
            dst[u] = paged_addr;
          }
        } else {
          buf[u] = valid ? lmc_load(reinterpret_cast<const VecT*>(paged_addr)) : lmc_zero<VecT>();
          dst[u] = obj_addr;
        }
      }
#pragma unroll
      for (int u = 0; u < LMC_ROWS_PER_THREAD; ++u) {
        if (dst[u] != nullptr) __stcs(reinterpret_cast<VecT*>(dst[u]), buf[u]);
      }
    }
  }
}

// The argument list shared by every entry point (kept in one place so the host code in
// lmcache/gpu_connector/cupy_kernels.py packs exactly this order).
#define LMC_TRANSFER_PARAMS                                                                  \
  const unsigned long long *__restrict__ layer_bases, unsigned long long single_layer_base,  \
      const long long *__restrict__ chunk_desc, const long long *__restrict__ slot_mapping,  \
      int *__restrict__ error_flag, long long num_slots, long long block_stride,             \
      long long tok_stride, long long head_stride, long long kv_stride, int block_size,      \
      int num_layers, int num_kv, int words_per_head, int words_per_row

#define LMC_TRANSFER_ARGS                                                                    \
  layer_bases, single_layer_base, chunk_desc, slot_mapping, error_flag, num_slots,           \
      block_stride, tok_stride, head_stride, kv_stride, block_size, num_layers, num_kv,      \
      words_per_head, words_per_row
