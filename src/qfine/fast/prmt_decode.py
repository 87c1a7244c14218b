"""The 4-bit code book decoded without memory access, for :mod:`qfine.fast.gemv_rows`: a 32-bit word of packed
codes (4 bytes, 8 weights, each byte's high nibble first, as bitsandbytes packs them) becomes eight 16-bit
code values by byte permutes (PTX ``prmt``) of the book's 32 bytes, held in eight registers. A ``prmt``
selects 4 bytes out of 8, so each of a value's two bytes takes three of them per four codes: one for codes
0-7, one for 8-15, one to pick between them by the code's top bit.

The decode is written once as a list of register operations (:func:`decode_program`), printed as PTX for
Triton's ``inline_asm_elementwise`` (:func:`decode_asm`) and executed by the tests against the code book.
Plain Python, so the tests run without a GPU or Triton.
"""

from __future__ import annotations

import torch


def code_words(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The 16 code values as ``dtype`` (16-bit) bits, split into a low-byte and a high-byte table of four
    little-endian 32-bit words each: [L0, L1, L2, L3, H0, H1, H2, H3], the tables :func:`decode_program`
    permutes."""
    bits = [int(v) & 0xFFFF for v in code.float().to(dtype).view(torch.int16).tolist()]
    if len(bits) != 16:
        raise ValueError("a 4-bit code book has 16 values")
    planes = [b & 0xFF for b in bits], [b >> 8 for b in bits]
    return [sum(plane[4 * w + i] << (8 * i) for i in range(4)) for plane in planes for w in range(4)]


def decode_program(out: str, word: int = 8, step: int = 1) -> list[tuple]:
    """The byte-permute decode of one 32-bit word of packed codes (4 bytes, 8 weights, each byte's high nibble
    first) as a list of (op, dst, src...) on 32-bit registers, for :func:`decode_asm` to print as PTX and for
    tests to execute. Inputs: ``$word`` the word, then the eight tables of :func:`code_words` every ``step``
    registers from ``$(word + step)``. Outputs
    ``$0`` … ``$7``: weight i of the word as fp32 (``out`` = "f32": the 16-bit value in the high half, so
    the value itself for bf16), or (``out`` = "b16") ``$0`` … ``$3`` pairs of 16-bit values (w0, w1) … (w6, w7),
    the first in the low half."""
    tables = {f"{plane}{i}": f"${word + step * (1 + 4 * j + i)}" for j, plane in enumerate("LH") for i in range(4)}
    # prmt reads its selector's four low nibbles, one per output byte: nibble 2i is byte i's low code, 2i+1 its
    # high code. Bits 0-2 index 8 table bytes (two registers); bit 3 picks the upper 8 codes (selector t)
    prog = [("and", "s", f"${word}", 0x77777777), ("shr", "t", f"${word}", 1), ("and", "t", "t", 0x44444444),
            ("or", "t", "t", 0x32103210)]
    for half in range(2):  # bytes 0-1 (weights 0-3), then bytes 2-3 (weights 4-7)
        if half:
            prog += [("shr", "s", "s", 16), ("shr", "t", "t", 16)]
        for plane, reg in (("L", "l"), ("H", "h")):
            prog += [("prmt", "a", tables[f"{plane}0"], tables[f"{plane}1"], "s"),
                     ("prmt", "b", tables[f"{plane}2"], tables[f"{plane}3"], "s"), ("prmt", reg, "a", "b", "t")]
        # l, h: low and high bytes of the values of (lo0, hi0, lo1, hi1); pair them as (hi0, lo0), (hi1, lo1)
        for pair, sel in enumerate((0x4051, 0x6273)):
            i = 4 * half + 2 * pair
            if out == "f32":
                prog += [("prmt", "p", "l", "h", sel), ("shl", f"${i}", "p", 16), ("and", f"${i + 1}", "p", 0xFFFF0000)]
            else:
                prog.append(("prmt", f"${2 * half + pair}", "l", "h", sel))
    return prog


def decode_asm(out: str) -> str:
    """PTX for ``tl.inline_asm_elementwise`` from :func:`decode_program`, outputs first:

    - "f32" (pack 1): inputs the word and the eight table words; outputs ``=r`` ×8, weight i as fp32;
    - "pairs" (pack 2): inputs the word twice (two elements of a tensor joined with itself) and the eight
      table words, each also given twice (pack 2 passes two registers per 32-bit input); outputs ``=r``
      ×4, pair j (w2j, w2j+1) as the two 16-bit elements of output j. The caller's tensors then hold each
      pair in one register, as a 16-bit matrix operand wants them."""
    # "pairs": $4 and $5 are the same word, the tables $6, $8, … $20
    prog = decode_program("b16", 4, 2) if out == "pairs" else decode_program(out)
    lines = ["{", ".reg .b32 s, t, a, b, l, h, p;"]
    for op, dst, *src in prog:
        args = ", ".join(f"{v:#x}" if isinstance(v, int) else v for v in src)
        lines.append(f"{op}.b32 {dst}, {args};")
    return "\n".join(lines + ["}"])
