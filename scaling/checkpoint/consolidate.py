"""One safetensors file of a checkpoint's student and/or teacher, written one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a consolidated 7B checkpoint
would need the whole model in RAM (the classic consolidation OOM). The safetensors layout is simple
enough to stream: 8 bytes of little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, padded with spaces to a multiple of 8, then the tensors' bytes back to back
(https://github.com/huggingface/safetensors, "Format"). The header is known before any tensor is
read (names, shapes and dtypes come from the checkpoint's metadata), so each tensor is read from the
checkpoint, converted, written and dropped before the next: peak memory is about the largest
tensor plus a fixed overhead. The result is read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from scaling.checkpoint import open_part
from scaling.checkpoint.formats import SAFETENSORS_DTYPES

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidate(checkpoint: str | Path, out: str | Path, *, part: str = "student",
                dtype: torch.dtype | None = None) -> dict:
    """Write ``part`` (``student``, ``teacher`` or ``both``) of a checkpoint to the safetensors file
    ``out``. Keys: the part's own (``Data2Vec.state_dict()`` keys for the student, ``encoder.*`` for the
    teacher); with ``both``, prefixed ``student.`` / ``teacher.``. ``dtype`` converts floating tensors
    (default: as stored, fp32). Returns what was written: path, step, tensor count and bytes."""
    parts = ["student", "teacher"] if part == "both" else [part]
    plan, ckpt, meta = [], None, None
    for p in parts:
        ckpt, meta, source = open_part(checkpoint, p)
        prefix = f"{p}." if part == "both" else ""
        for name, info in source.infos.items():
            out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            plan.append((prefix + name, source, name, info.shape, out_dtype))
    header: dict = {"__metadata__": {"format": "pt", "scaling.part": part, "scaling.step": str(meta["step"]),
                                     "scaling.model": json.dumps(meta["model"])}}
    offset = 0
    for key, _, _, shape, out_dtype in plan:
        nbytes = math.prod(shape) * out_dtype.itemsize
        header[key] = {"dtype": _DTYPE_CODES[out_dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, source, name, _, out_dtype in plan:
            t = source.read(name).to(out_dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    os.replace(tmp, out)
    return {"path": str(out), "checkpoint": str(ckpt), "step": int(meta["step"]), "tensors": len(plan),
            "bytes": offset}
