"""CUDA path of :class:`lmcache.blend.rotary.FusedRotaryEmb`: ``csrc/rotary_k.cu`` via CuPy.

The kernel rotates each (token, head, channel pair) of K in place by precomputed float32
cos/sin of the angle delta, rounding every product and sum separately, so its result equals the
torch path on the same device bit for bit. float32 and bfloat16 K; compiled with NVRTC on first
use per device and dtype (CuPy caches the binary on disk) and launched on the current torch
stream. Nothing imports CuPy until :func:`rotate_k_cuda` runs.
"""

from __future__ import annotations

import functools

import torch

from lmcache.gpu_connector.cupy_kernels import csrc_dir, cupy_available

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_THREADS = 256

__all__ = ["KERNEL_DTYPES", "cuda_kernel_usable", "rotate_k_cuda"]


def cuda_kernel_usable(k: torch.Tensor) -> bool:
    """True when ``k`` is a CUDA tensor of a kernel dtype with contiguous heads and CuPy sees
    a device (never raises)."""
    return (k.is_cuda and k.dtype in KERNEL_DTYPES and k.dim() in (2, 3)
            and k.stride(-1) == 1 and (k.dim() == 2 or k.stride(1) == k.shape[2])
            and cupy_available())


@functools.lru_cache(maxsize=None)
def _function(device_index: int, bf16: bool):
    import cupy  # noqa: PLC0415

    code = (csrc_dir() / "rotary_k.cu").read_text()
    options = ("-std=c++17",) + (("-DSCALAR_BF16",) if bf16 else ())
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=code, options=options)
        module.compile()
        return module.get_function("rotary_k")


def rotate_k_cuda(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int,
                  rotary_dim: int, is_neox_style: bool) -> None:
    """Rotate ``k`` in place on its device.

    Args:
        k: ``[num_tokens, num_heads*head_size]`` or ``[num_tokens, num_heads, head_size]``
            CUDA tensor (float32 or bfloat16) with contiguous heads (any token stride).
        cos, sin: float32 ``[num_tokens, rotary_dim // 2]`` on ``k``'s device (made
            contiguous here).

    Raises:
        ValueError: ``k`` not usable by the kernel (see :func:`cuda_kernel_usable`).
    """
    import cupy  # noqa: PLC0415

    if not cuda_kernel_usable(k):
        raise ValueError(f"rotary CUDA kernel needs a CUDA float32/bfloat16 k with contiguous "
                         f"heads, got {k.dtype} {tuple(k.shape)} stride {k.stride()} on {k.device}")
    n = k.shape[0]
    num_heads = (k.shape[1] // head_size) if k.dim() == 2 else k.shape[1]
    rot_half = rotary_dim // 2
    total = n * num_heads * rot_half
    if total == 0:
        return
    cos = cos.to(device=k.device, dtype=torch.float32).contiguous()
    sin = sin.to(device=k.device, dtype=torch.float32).contiguous()
    dev = k.device.index if k.device.index is not None else torch.cuda.current_device()
    fn = _function(dev, k.dtype == torch.bfloat16)
    stream = torch.cuda.current_stream(k.device)
    with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream.cuda_stream, dev):
        fn(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
           (k.data_ptr(), cos.data_ptr(), sin.data_ptr(), cupy.int64(n), cupy.int32(num_heads),
            cupy.int32(head_size), cupy.int32(rot_half), cupy.int64(k.stride(0)),
            cupy.int32(1 if is_neox_style else 0)))
