"""A 4-bit (bitsandbytes NF4/FP4) product for 1 to 16 token rows (64 with ``QFINE_MMA_ROWS=64``) on tensor
cores, written in CUDA C++ (``mma4.cu``, compiled by NVRTC through :mod:`qfine.fast.nvrtc`):
:mod:`qfine.fast.gemv_kernel`'s tuner times it beside the Triton kernels as ``KERNEL`` "mma".

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
import os
import weakref

import torch

from qfine.fast import nvrtc

GROUP = 4  # absmax blocks per loop step in mma4.cu
_ADAPTER_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KERNELS: dict[tuple, nvrtc.Kernel] = {}
_PAIRS: dict[int, tuple] = {}  # id(quant state) -> (weak reference, {dtype: table})


# Programmatic dependent launch (sm_90 on; QFINE_PDL=0 turns it off): the kernel may start while the
# down-products' kernel before it runs, filling its table and requesting its first weights, and waits for that
# kernel only before reading x, the adapter's xa and the residual; the down-products' kernel after it may
# likewise start and request its A. Every such kernel waits before it writes, so each waits, through the one
# before, on all earlier ones.
EARLY = {"on": os.environ.get("QFINE_PDL", "1") != "0"}


def early(device: torch.device) -> bool:
    """Whether launches on ``device`` are programmatic dependent launches (see :data:`EARLY`)."""
    return EARLY["on"] and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def triton_launch(device: torch.device) -> dict:
    """Launch options of the decode step's Triton kernels that take ``EARLY`` (4 warps): as programmatic
    dependent launches where :func:`early` says so."""
    on = early(device)
    return {"EARLY": on, "num_warps": 4, **({"launch_pdl": True} if on else {})}


def _fetch_variants(spec: str) -> list[dict]:
    """``QFINE_MMA_FETCH`` ("L2B=256;AHEAD=4;BULK=4,L2B=256"): ways of requesting the weights from memory
    that :func:`candidates` offers beside each setting's plain one, for the tuner to time (see ``mma4.cu``'s
    L2B, AHEAD and BULK). Empty: the plain loads only."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        pairs = [kv.strip().split("=", 1) for kv in item.split(",")]
        if any(len(kv) != 2 or kv[0] not in ("L2B", "AHEAD", "BULK") or not kv[1].isdigit() for kv in pairs):
            raise ValueError(f"QFINE_MMA_FETCH: {item!r} is not NAME=N[,NAME=N] with NAME one of L2B, AHEAD, BULK")
        out.append({key: int(value) for key, value in pairs})
    return out


# the ways that won at the 8B shapes on an H100 (L2B=256 for gate/up, BULK=4,L2B=256 for the rest);
# QFINE_MMA_FETCH="" offers the plain loads only
DEFAULT_FETCH = "L2B=256;BULK=4,L2B=256"
FETCH = _fetch_variants(os.environ.get("QFINE_MMA_FETCH", DEFAULT_FETCH))


# the most token rows the "mma" settings are offered for: 16 (1 or 2 tiles of 8); QFINE_MMA_ROWS=64 offers 4
# and 8 tiles too (up to 64 rows, a GRPO rollout's batch; the epilogue's inputs are then read after the
# loop, so that 8 tiles fit in registers), off until their GPU test has run on a GPU
ROWS = {"max": 64 if os.environ.get("QFINE_MMA_ROWS") == "64" else 16}


def token_tiles(m: int) -> int:
    """Tiles of 8 token rows (``NT``) a launch for m rows holds: 1, 2, 4 or 8."""
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def shared_bytes(wide: bool) -> int:
    """Dynamic shared memory of a launch: the per-lane pair table (rows of 32 or, WIDE, 64 words) and two
    second-level code books."""
    return (256 * (64 if wide else 32) + 512) * 4


def fits(cfg: dict, m: int, k: int, blocksize: int) -> bool:
    """Whether an "mma" setting serves m token rows of k: m ≤ 8·NT, every warp's k range a whole number of
    loop steps, and (several warps a row group) their fp32 sums of every row and token fitting in the
    table's shared memory, where they meet."""
    per = blocksize * GROUP * cfg["WARPS"] * cfg["SPLIT"]
    sums = cfg.get("RW", 1) * cfg["WARPS"] * cfg["TILES"] * cfg["NT"] * 4 * 32 * 4
    return (m <= 8 * cfg["NT"] and blocksize in (64, 128) and k % per == 0
            and (cfg["WARPS"] == 1 or sums <= shared_bytes(bool(cfg.get("WIDE")))))


def candidates(m: int) -> list[dict]:
    """The "mma" settings worth timing for m ≤ ``ROWS["max"]`` rows: the table layout (WIDE: one instruction fewer per
    lookup, twice the shared memory), warps per row group (each a k range), row groups per block (RW),
    16-row tiles per warp, k splits. Few k ranges (RW > 1) give each warp a long loop: the big MLP
    products; many suit the small ones, whose rows alone do not fill the GPU. Each comes again with every
    way of requesting the weights in :data:`FETCH`."""
    if m > ROWS["max"]:
        return []
    nt = token_tiles(m)
    by_k = [dict(WARPS=warps, RW=1, TILES=tiles, SPLIT=split)
            for warps in (4, 8) for tiles in (1, 2) for split in (1, 2, 4)]
    by_rows = [dict(WARPS=warps, RW=rw, TILES=tiles, SPLIT=1)
               for warps in (1, 2, 4) for rw in (2, 4) for tiles in (1, 2)]
    plain = [{"KERNEL": "mma", "NT": nt, "WIDE": wide, **cfg} for wide in (True, False) for cfg in by_k + by_rows]
    return plain + [{**cfg, **fetch} for fetch in FETCH for cfg in plain]


def row_tile(m: int) -> int:
    """The row count a 4-bit tuner's timing is kept for (:mod:`qfine.fast.gemv_kernel`): rows share it with
    the others of their tile height (1, 8, 16, 32, 64), so a prompt of any length up to 64 tokens does not
    time its own. 8 and 16 differ because the settings here for up to 8 rows hold one token tile of 8
    (``NT`` 1), which does not serve 9 to 16."""
    return 1 if m == 1 else max(8, 1 << (m - 1).bit_length())


def _source(defines: dict) -> str:
    head = "".join(f"#define {name} {int(value)}\n" for name, value in sorted(defines.items()))
    return head + (importlib.resources.files("qfine.fast") / "mma4.cu").read_text()


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _kernel(device: torch.device, defines: dict) -> nvrtc.Kernel:
    """The kernel compiled with these #defines for this device (compiled once per process and device)."""
    key = (device.index, tuple(sorted(defines.items())))
    if key not in _KERNELS:
        with torch.cuda.device(device):
            kernel = nvrtc.Kernel(nvrtc.compile_cubin(_source(defines), _arch(device), "mma4.cu"), "qfine_mma4")
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


def _weight_args(weight, m: int) -> tuple[list, dict]:
    """(packed, absmax, code8, absmax2, offset) of a 4-bit weight as the kernel reads them, and its defines."""
    state = weight.quant_state
    nested = bool(state.nested)
    if nested and state.state2.blocksize % GROUP:
        raise ValueError("the mma kernel reads four absmax blocks of one second-level block at a time")
    packed, absmax = weight.data, state.absmax
    if not _aligned(packed, absmax):
        raise ValueError("the mma kernel reads 16-byte aligned weights")
    code8 = state.state2.code if nested else state.code
    absmax2 = state.state2.absmax if nested else absmax
    offset = state.offset if nested else absmax
    return [packed, absmax, code8, absmax2, offset], dict(BS=state.blocksize, NESTED=nested,
                                                          BS2=state.state2.blocksize if nested else 256)


def _lora_args(lora, m: int, x2: torch.Tensor) -> tuple:
    """(xa (m, r) with unit column stride, B (n, r) in xa's dtype, scale, r) of an adapter term, or dummies."""
    if lora is None:
        return x2, x2, 0.0, 1
    xa, lora_b, scale = lora
    r = xa.shape[-1]
    xa = xa.reshape(m, r)
    if xa.stride(1) != 1:
        xa = xa.contiguous()
    return xa, lora_b.to(xa.dtype).contiguous(), float(scale), r


def precompile(x2: torch.Tensor, members: list[tuple], residual, settings: list[dict], pair: bool = False) -> None:
    """Compile the kernels that these "mma" settings would launch for these operands, side by side on the
    CPU's cores (NVRTC releases the GIL; about half a second each), so that a tuner's first timing of each
    does not wait for its compile. Settings that do not fit are left out."""
    from concurrent.futures import ThreadPoolExecutor

    sources = set()
    for cfg in settings:
        try:
            sources.add(_source(_defines(x2, members, residual, cfg, pair)[0]))
        except ValueError:
            continue
    arch = _arch(x2.device)

    def build(src: str) -> None:
        try:
            nvrtc.compile_cubin(src, arch, "mma4.cu")
        except RuntimeError:  # no NVRTC here, or a setting it cannot build: the tuner leaves that setting out
            pass

    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(build, sorted(sources)))


def _defines(x2: torch.Tensor, members: list[tuple], residual, cfg: dict, pair: bool) -> tuple[dict, list, list]:
    """(the kernel's #defines, each weight's arguments, each adapter's arguments) for a launch."""
    k, m = members[0][0].quant_state.shape[1], x2.shape[0]
    if x2.dtype not in (torch.bfloat16, torch.float16) or not fits(cfg, m, k, members[0][0].quant_state.blocksize):
        raise ValueError("the mma kernel takes 16-bit activations and whole loop steps of k")
    weights, defines = zip(*[_weight_args(w, m) for w, _ in members])
    if any(d != defines[0] for d in defines) or len({w.quant_state.quant_type for w, _ in members}) > 1:
        raise ValueError("the weights of one launch differ in code book, block size or nesting")
    if len(members) > 1 and not pair and (cfg["SPLIT"] != 1 or residual is not None or len(members) > 3):
        raise ValueError("a group is 2 or 3 weights without k splits across blocks or a residual")
    loras = [_lora_args(lora, m, x2) for _, lora in members]
    if len({(xa.stride(0), xa.dtype, rank) for xa, _b, _s, rank in loras}) > 1:
        raise ValueError("the adapters of one launch differ in dtype, rank or row stride")
    has_lora = members[0][1] is not None
    if any((lora is not None) != has_lora for _, lora in members):
        raise ValueError("either every weight of one launch has an adapter or none")
    xa, r = loras[0][0], loras[0][3]
    return dict(defines[0], NT=cfg["NT"], TILES=cfg["TILES"], WARPS=cfg["WARPS"], RW=cfg.get("RW", 1),
                SPLIT=cfg["SPLIT"], LORA=has_lora,
                RESIDUAL=residual is not None, F16=x2.dtype == torch.float16,
                ADT=_ADAPTER_DTYPES[xa.dtype] if has_lora else 0, WIDE=bool(cfg.get("WIDE")), PAIR=pair,
                LORA_R=r, NG=1 if pair else len(members), PDL=early(x2.device),
                L2B=cfg.get("L2B", 0), AHEAD=cfg.get("AHEAD", 0), BULK=cfg.get("BULK", 0)), weights, loras


class W4(ctypes.Structure):
    """``struct W4`` of ``mma4.cu``: one weight of a launch and where its rows' outputs go."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("packed", "absmax_q", "code8", "absmax2", "offset", "xa",
                                                      "lora_b", "out", "res")]
    _fields_ += [("scale", ctypes.c_float), ("n", ctypes.c_int), ("ctas", ctypes.c_int)]


def _launch(x2: torch.Tensor, members: list[tuple], residual, cfg: dict, outs: list[torch.Tensor], pair: bool) -> None:
    """One launch of ``mma4.cu``: for one weight, for two of one shape written as silu(y₁)·y₂ (``pair``,
    one output), or for 2–3 weights of one k, each rows' block from one of them, into its own output.
    ``outs``: per output, (m, nᵢ) in x2's dtype, or (SPLIT, m, n) fp32 partials for one weight."""
    k, m = members[0][0].quant_state.shape[1], x2.shape[0]
    defines, weights, loras = _defines(x2, members, residual, cfg, pair)
    rw = cfg.get("RW", 1)
    rows = (16 if pair else 16 * cfg["TILES"]) * rw
    structs = []
    for i, (weight, (xa, lora_b, scale, _r)) in enumerate(zip(weights, loras)):
        n = members[i][0].quant_state.shape[0]
        out = outs[0] if pair else outs[i]
        res = out if residual is None else residual
        ptrs = [t.data_ptr() for t in (*weight, xa, lora_b, out, res)]
        structs.append(W4(*ptrs, float(scale), n, -(-n // rows)))
    structs += [structs[-1]] * (3 - len(structs))
    kernel = _kernel(x2.device, defines)
    state = members[0][0].quant_state
    grid_x = structs[0].ctas if pair else sum(w.ctas for w in structs[:len(members)])
    stride_xa = loras[0][0].stride(0)
    kernel((grid_x, cfg["SPLIT"]), 32 * cfg["WARPS"] * rw, shared_bytes(bool(cfg.get("WIDE"))),
           [ctypes.c_void_p(x2.data_ptr()), ctypes.c_void_p(pair_table(state, x2.dtype).data_ptr()),
            ctypes.c_int(m), ctypes.c_int(k), ctypes.c_int(x2.stride(0)), ctypes.c_int(stride_xa), *structs],
           early=bool(defines["PDL"]))


def _rows(x2: torch.Tensor) -> torch.Tensor:
    """x2 as the kernel reads it: unit column stride, rows 16-byte aligned."""
    if x2.stride(1) != 1 or not _aligned(x2) or x2.stride(0) % 8:
        x2 = x2.contiguous()
    return x2


def matmul_mma(x2: torch.Tensor, weight, lora, residual, cfg: dict, sum_splits) -> torch.Tensor:
    """(m, n) = x2 (m ≤ 8·NT, k) @ Wᵀ (+ s·xa Bᵀ, + residual) in x2's dtype with ``mma4.cu``; ``cfg`` one of
    :func:`candidates` that :func:`fits`. ``sum_splits(part, out, res, size, split, residual)`` adds k
    splits' fp32 partials (:mod:`qfine.fast.gemv_rows`' kernel). Capturable in a CUDA graph once this
    setting has run outside one (compilation)."""
    x2 = _rows(x2)
    (n, _k), m = weight.quant_state.shape, x2.shape[0]
    split = cfg["SPLIT"]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    res = None if residual is None else residual.reshape(m, n).contiguous()
    _launch(x2, [(weight, lora)], res, cfg, [part], False)
    if split > 1:
        sum_splits(part, out, out if res is None else res, m * n, split, res is not None)
    return out


def pair_candidates(m: int) -> list[dict]:
    """The settings for :func:`matmul_mma_silu`: two 16-row tiles (one per weight), no k split across blocks."""
    return [cfg for cfg in candidates(m) if cfg["SPLIT"] == 1 and cfg["TILES"] == 2]


def matmul_mma_silu(x2: torch.Tensor, gate: tuple, up: tuple, cfg: dict) -> torch.Tensor:
    """silu(x2 Wgᵀ + …) · (x2 Wuᵀ + …) (m, n) for (weight, lora) pairs ``gate`` and ``up`` of one shape: each
    product (adapter term added in fp32) rounded to x2's dtype, then silu(g)·u in fp32, rounded once (the
    MLP's ``act_fn(gate_proj(x)) * up_proj(x)`` as a compiled kernel computes it), in one launch."""
    x2 = _rows(x2)
    n, m = gate[0].quant_state.shape[0], x2.shape[0]
    if up[0].quant_state.shape != gate[0].quant_state.shape or cfg["SPLIT"] != 1 or cfg["TILES"] != 2:
        raise ValueError("silu pairs take two weights of one shape, two tiles and no k split")
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    _launch(x2, [gate, up], None, cfg, [out], True)
    return out


def group_candidates(m: int) -> list[dict]:
    """The settings for :func:`matmul_mma_group`: those of :func:`candidates` without k splits across blocks."""
    return [cfg for cfg in candidates(m) if cfg["SPLIT"] == 1]


def matmul_mma_group(x2: torch.Tensor, members: list[tuple], cfg: dict) -> list[torch.Tensor]:
    """[x2 @ Wᵢᵀ (+ sᵢ·xaᵢ Bᵢᵀ)] (m, nᵢ) in x2's dtype for 2 or 3 (weight, lora) pairs of one k, code book and
    block size (q, k, v) in one launch: each block of the grid takes rows of one weight, so the small ones
    (k, v) fill the GPU's gaps beside the large one. ``cfg``: one of :func:`group_candidates`. The adapters'
    xa must share their dtype, rank and row stride (column views of one tensor, as the fused down-products
    give them). Capturable in a CUDA graph once this setting has run outside one."""
    x2 = _rows(x2)
    m = x2.shape[0]
    outs = [torch.empty(m, w.quant_state.shape[0], dtype=x2.dtype, device=x2.device) for w, _ in members]
    _launch(x2, members, None, cfg, outs, False)
    return outs
