// RoPE re-positioning of cached K (lmcache.blend.rotary, LMCache's fused_rotary_emb).
// k: [num_tokens, row_stride elements], head h of token t at k + t*row_stride + h*head_size.
// cos/sin: float32 [num_tokens, rot_half] of the angle delta (new - old), computed by the caller.
// One thread per (token, head, pair): neox pairs (i, i + rot_half), gptj pairs (2i, 2i + 1).
// Products and sums are rounded separately (no FMA) so results equal the torch path bit for bit.
// SCALAR_BF16 selects bfloat16 storage (round to nearest even, as torch), else float32.

#ifdef SCALAR_BF16
typedef unsigned short scalar_t;
__device__ __forceinline__ float load_f(scalar_t v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ scalar_t store_f(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (scalar_t)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (scalar_t)(u >> 16);
}
#else
typedef float scalar_t;
__device__ __forceinline__ float load_f(scalar_t v) { return v; }
__device__ __forceinline__ scalar_t store_f(float f) { return f; }
#endif

extern "C" __global__ void rotary_k(scalar_t* k, const float* cos_t, const float* sin_t,
                                    long long num_tokens, int num_heads, int head_size,
                                    int rot_half, long long row_stride, int neox) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = num_tokens * num_heads * rot_half;
    if (idx >= total) return;
    int i = (int)(idx % rot_half);
    long long th = idx / rot_half;
    int h = (int)(th % num_heads);
    long long t = th / num_heads;
    scalar_t* head = k + t * row_stride + (long long)h * head_size;
    int a = neox ? i : 2 * i;
    int b = neox ? i + rot_half : 2 * i + 1;
    float c = cos_t[t * rot_half + i], s = sin_t[t * rot_half + i];
    float x1 = load_f(head[a]), x2 = load_f(head[b]);
    head[a] = store_f(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    head[b] = store_f(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}
