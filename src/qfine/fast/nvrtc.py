"""CUDA C++ kernels compiled at run time: NVRTC (the run-time compiler that CUDA builds of torch ship) turns a
source into a cubin for the current device, the CUDA driver loads it, and :class:`Kernel` launches it on
torch's current stream (so a CUDA-graph capture records it). Plain ctypes on the two libraries' public C
APIs; nothing here runs without a GPU.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
from pathlib import Path

import torch

_LIBS: dict[str, ctypes.CDLL] = {}
_CUBINS: dict[str, bytes] = {}  # by the hash of source, architecture and NVRTC version


def _library(kind: str) -> ctypes.CDLL:
    """libnvrtc (``kind`` "nvrtc", found by its soname, which torch has usually loaded already, else in a
    ``nvidia`` wheel on sys.path) or libcuda (the driver)."""
    if kind in _LIBS:
        return _LIBS[kind]
    if kind == "cuda":
        names = ["libcuda.so.1", "libcuda.so"]
    else:
        major = (torch.version.cuda or "12").split(".")[0]
        names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
        for root in sys.path:
            names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"libnvrtc.so.{major}*")))
            names += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libnvrtc.so*")))
    for name in names:
        try:
            _LIBS[kind] = ctypes.CDLL(name)
            return _LIBS[kind]
        except OSError:
            continue
    raise RuntimeError(f"the CUDA {kind} library was not found (tried {names[:3]})")


def _check_cuda(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _library("cuda").cuGetErrorString(result, ctypes.byref(text))
        raise RuntimeError(f"{what}: {text.value.decode() if text.value else result}")


def _version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _library("nvrtc").nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def compile_cubin(source: str, arch: int, name: str = "kernel.cu") -> bytes:
    """The cubin of ``source`` for sm_``arch`` (e.g. 90), kept under ~/.cache/qfine/cubin by a hash of the
    source, the architecture and NVRTC's version (each setting of a kernel is a source). Raises RuntimeError
    with NVRTC's log on a compile error."""
    key = hashlib.sha256(f"{arch}\n{_version()}\n{source}".encode()).hexdigest()[:32]
    if key in _CUBINS:
        return _CUBINS[key]
    path = Path(os.environ.get("QFINE_CACHE", Path.home() / ".cache" / "qfine")) / "cubin" / f"{key}.cubin"
    if path.is_file():
        _CUBINS[key] = path.read_bytes()
        return _CUBINS[key]
    cubin = _CUBINS[key] = _compile(source, arch, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)  # whole or absent: another process may be reading it
    except OSError:
        pass  # a read-only home only costs the next process a compile
    return cubin


def _compile(source: str, arch: int, name: str) -> bytes:
    lib = _library("nvrtc")
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17"]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if result:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)):
            raise RuntimeError("nvrtcGetCUBINSize failed")
        cubin = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(prog, cubin):
            raise RuntimeError("nvrtcGetCUBIN failed")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class Kernel:
    """One ``extern "C"`` kernel of a cubin, loaded into the current device's context. Arguments are given as
    ctypes values (c_void_p for pointers, c_int, c_float) in the kernel's order."""

    def __init__(self, cubin: bytes, name: str):
        cuda = _library("cuda")
        torch.cuda.current_stream()  # makes torch's context current on this thread
        self._module, self._func = ctypes.c_void_p(), ctypes.c_void_p()
        self._cubin = ctypes.create_string_buffer(cubin, len(cubin))
        _check_cuda(cuda.cuModuleLoadData(ctypes.byref(self._module), self._cubin), "cuModuleLoadData")
        _check_cuda(cuda.cuModuleGetFunction(ctypes.byref(self._func), self._module, name.encode()),
                    f"cuModuleGetFunction({name})")

    def allow_shared(self, nbytes: int) -> None:
        """Let launches take ``nbytes`` of dynamic shared memory (needed above 48 KiB)."""
        _check_cuda(_library("cuda").cuFuncSetAttribute(self._func, 8, nbytes),  # MAX_DYNAMIC_SHARED_SIZE_BYTES
                    "cuFuncSetAttribute")

    def __call__(self, grid: tuple[int, int], block: int, shared: int, args: list, early: bool = False) -> None:
        """Launch on torch's current stream: ``grid`` (x, y) blocks of ``block`` threads, ``shared`` bytes of
        dynamic shared memory (above 48 KiB only after :meth:`allow_shared`). ``early``: as a programmatic
        dependent launch (sm_90 on), which may start once every block of the previous kernel has run
        ``griddepcontrol.launch_dependents``; the kernel must then run ``griddepcontrol.wait`` before it reads
        what that kernel wrote."""
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if not early:
            _check_cuda(_library("cuda").cuLaunchKernel(self._func, grid[0], grid[1], 1, block, 1, 1, shared,
                                                       stream, ptrs, None), "cuLaunchKernel")
            return
        attr = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        config = _LaunchConfig(grid[0], grid[1], 1, block, 1, 1, shared, stream, ctypes.pointer(attr), 1)
        _check_cuda(_library("cuda").cuLaunchKernelEx(ctypes.byref(config), self._func, ptrs, None),
                    "cuLaunchKernelEx")


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig of cuLaunchKernelEx."""
    _fields_ = [(name, ctypes.c_uint) for name in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z",
                                                    "shared")]
    _fields_ += [("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("count", ctypes.c_uint)]
