"""Base-weight kinds behind one registry (:mod:`.registry`): one module per kind.

* :mod:`.bnb4` — bitsandbytes NF4/FP4 (``nf4``, ``fp4``, and ``adaptive``'s 4-bit layers)
* :mod:`.int8` — bitsandbytes LLM.int8() (``int8``, and ``adaptive``'s sensitive layers)
* :mod:`.int4` — group-wise asymmetric INT4, QA-LoRA's base (``int4``)
* 16-bit ``nn.Linear`` (``none``), the fallback
* :mod:`.adaptive` — which layers of a model go to int8 within a memory budget

``KINDS.of(module)`` names the kind of a loaded layer (first match wins); ``KINDS.dequantize(module)``
is the exact fp32 weight every merge and every fused-kernel reference reads.
"""

from qfine.quant import bnb4, int4, int8
from qfine.quant.registry import DENSE, BaseWeight, Registry, Settings

KINDS = Registry([int4.KIND, bnb4.KIND, int8.KIND, DENSE])

__all__ = ["DENSE", "KINDS", "BaseWeight", "Registry", "Settings", "bnb4", "int4", "int8"]
