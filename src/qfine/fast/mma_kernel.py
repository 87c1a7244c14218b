"""A 4-bit (bitsandbytes NF4/FP4) product for 1 to 16 token rows on tensor cores, written in CUDA C++
(``mma4.cu``, compiled by NVRTC through :mod:`qfine.fast.nvrtc`): :mod:`qfine.fast.gemv_kernel`'s tuner times
it beside the Triton kernels as ``KERNEL`` "mma".

Why CUDA here: a decode step at batch 1 reads each weight once, so the kernel must spend about two
instructions per weight to keep up with memory. The code book's values are found by one shared-memory lookup
per packed byte (two weights) and multiplied on tensor cores straight from registers; that needs control over
which thread holds which weights, which Triton's layouts do not give. See ``mma4.cu`` for the layout and the
numerics (the same as the Triton kernels': fp32 block products scaled by their absmax, adapter and residual
added in fp32 before the one rounding).
"""

from __future__ import annotations

import ctypes
import importlib.resources
import weakref

import torch
import triton

from qfine.fast import nvrtc

GROUP = 4  # absmax blocks per loop step in mma4.cu
_ADAPTER_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KERNELS: dict[tuple, nvrtc.Kernel] = {}
_PAIRS: dict[int, tuple] = {}  # id(quant state) -> (weak reference, {dtype: table})


def shared_bytes(wide: bool) -> int:
    """Dynamic shared memory of a launch: the per-lane pair table (rows of 32 or, WIDE, 64 words) and the
    second-level code book."""
    return (256 * (64 if wide else 32) + 256) * 4


def fits(cfg: dict, m: int, k: int, blocksize: int) -> bool:
    """Whether an "mma" setting serves m token rows of k: m ≤ 8·NT, and every warp's k range a whole number
    of loop steps."""
    per = blocksize * GROUP * cfg["WARPS"] * cfg["SPLIT"]
    return m <= 8 * cfg["NT"] and blocksize in (64, 128) and k % per == 0


def candidates(m: int) -> list[dict]:
    """The "mma" settings worth timing for m ≤ 16 rows: the table layout (WIDE: one instruction fewer per
    lookup, twice the shared memory), warps per block (each a k range), 16-row tiles per warp, k splits."""
    if m > 16:
        return []
    nt = 1 if m <= 8 else 2
    return [{"KERNEL": "mma", "NT": nt, "WARPS": warps, "TILES": tiles, "SPLIT": split, "WIDE": wide}
            for wide in (True, False) for warps in (4, 8) for tiles in (1, 2) for split in (1, 2, 4)]


def _kernel(device: torch.device, defines: dict) -> nvrtc.Kernel:
    """The kernel compiled with these #defines for this device (compiled once per process and device)."""
    key = (device.index, tuple(sorted(defines.items())))
    if key not in _KERNELS:
        major, minor = torch.cuda.get_device_capability(device)
        source = (importlib.resources.files("qfine.fast") / "mma4.cu").read_text()
        head = "".join(f"#define {name} {int(value)}\n" for name, value in sorted(defines.items()))
        with torch.cuda.device(device):
            kernel = nvrtc.Kernel(nvrtc.compile_cubin(head + source, 10 * major + minor, "mma4.cu"), "qfine_mma4")
            kernel.allow_shared(shared_bytes(bool(defines["WIDE"])))
            _KERNELS[key] = kernel
    return _KERNELS[key]


def pair_table(state, dtype: torch.dtype) -> torch.Tensor:
    """(256,) int32 on the state's device: for packed byte b, code[b >> 4] (low half) and code[b & 15] (high
    half) as ``dtype`` (16-bit) bits, the order of the two weights along k. Built once per quant state and
    dtype, on its first (uncaptured) call."""
    ref, by_dtype = _PAIRS.get(id(state), (None, None))
    if ref is None or ref() is not state:
        for key in [key for key, (r, _) in _PAIRS.items() if r() is None]:
            del _PAIRS[key]
        by_dtype = {}
        _PAIRS[id(state)] = (weakref.ref(state), by_dtype)
    if dtype not in by_dtype:
        bits = state.code.float().to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        byte = torch.arange(256, device=bits.device)
        words = bits[byte >> 4] | (bits[byte & 15] << 16)
        by_dtype[dtype] = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return by_dtype[dtype]


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def matmul_mma(x2: torch.Tensor, weight, lora, residual, cfg: dict, sum_splits) -> torch.Tensor:
    """(m, n) = x2 (m ≤ 16, k) @ Wᵀ (+ s·xa Bᵀ, + residual) in x2's dtype with ``mma4.cu``; ``cfg`` one of
    :func:`candidates` that :func:`fits`. ``sum_splits(part, out, res, size, split, residual)`` adds k
    splits' fp32 partials (:mod:`qfine.fast.gemv_rows`' kernel). Capturable in a CUDA graph once this
    setting has run outside one (compilation)."""
    state = weight.quant_state
    (n, k), m = state.shape, x2.shape[0]
    if x2.dtype not in (torch.bfloat16, torch.float16) or not fits(cfg, m, k, state.blocksize):
        raise ValueError("the mma kernel takes 16-bit activations and whole loop steps of k")
    nested = bool(state.nested)
    if nested and state.state2.blocksize % GROUP:
        raise ValueError("the mma kernel reads four absmax blocks of one second-level block at a time")
    if x2.stride(1) != 1 or not _aligned(x2) or x2.stride(0) % 8:
        x2 = x2.contiguous()
    packed, absmax = weight.data, state.absmax
    if not _aligned(packed, absmax):
        raise ValueError("the mma kernel reads 16-byte aligned weights")
    split = cfg["SPLIT"]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    res = out if residual is None else residual.reshape(m, n).contiguous()
    xa, lora_b, scale, r, adt = x2, x2, 0.0, 1, 0
    if lora is not None:
        xa, lora_b, scale = lora
        r = xa.shape[-1]
        xa = xa.reshape(m, r)
        if xa.stride(1) != 1:
            xa = xa.contiguous()
        lora_b = lora_b.to(xa.dtype).contiguous()
        adt = _ADAPTER_DTYPES[xa.dtype]
    defines = dict(BS=state.blocksize, NESTED=nested, BS2=state.state2.blocksize if nested else 256, NT=cfg["NT"],
                   TILES=cfg["TILES"], WARPS=cfg["WARPS"], SPLIT=split, LORA=lora is not None,
                   RESIDUAL=residual is not None, F16=x2.dtype == torch.float16, ADT=adt, WIDE=bool(cfg.get("WIDE")))
    kernel = _kernel(x2.device, defines)
    code8 = state.state2.code if nested else state.code
    absmax2 = state.state2.absmax if nested else absmax
    offset = state.offset if nested else absmax
    ptr = [ctypes.c_void_p(t.data_ptr()) for t in (x2, packed, pair_table(state, x2.dtype), absmax, code8, absmax2,
                                                  offset, part, res, xa, lora_b)]
    ints = [ctypes.c_int(v) for v in (m, n, k, x2.stride(0), xa.stride(0), r)]
    kernel((triton.cdiv(n, 16 * cfg["TILES"]), split), 32 * cfg["WARPS"], shared_bytes(bool(cfg.get("WIDE"))),
           ptr + [ctypes.c_float(float(scale))] + ints)
    if split > 1:
        sum_splits(part, out, res, m * n, split, residual is not None)
    return out
