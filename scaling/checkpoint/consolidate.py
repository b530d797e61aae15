"""One safetensors file of a checkpoint's student and/or teacher, written one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a consolidated 7B checkpoint
would need the whole model in RAM (the classic consolidation OOM). The safetensors layout is simple
enough to stream: 8 bytes of little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, padded with spaces to a multiple of 8, then the tensors' bytes back to back
(https://github.com/huggingface/safetensors, "Format"). The header is known before any tensor is
read (names, shapes and dtypes come from the checkpoint's metadata), so each tensor is read from the
checkpoint, converted, written and dropped before the next (read in runs of at most 16 MiB, so that a DCP
checkpoint is not re-planned per tensor): peak memory is about max(16 MiB, the largest tensor) plus a
fixed overhead. The result is read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from scaling.checkpoint import open_parts
from scaling.checkpoint.formats import SAFETENSORS_DTYPES

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


READ_BYTES = 16 * 2**20  # read at once (a larger tensor alone): bounds the memory, and the reads per file


def consolidate(checkpoint: str | Path, out: str | Path, *, part: str = "student",
                dtype: torch.dtype | None = None) -> dict:
    """Write ``part`` (``student``, ``teacher`` or ``both``) of a checkpoint to the safetensors file
    ``out``. Keys: the part's own (``Data2Vec.state_dict()`` keys for the student, ``encoder.*`` for the
    teacher); with ``both``, prefixed ``student.`` / ``teacher.``. ``dtype`` converts floating tensors
    (default: as stored, fp32). Returns what was written: path, step, tensor count and bytes."""
    ckpt, meta, by_part = open_parts(checkpoint, ["student", "teacher"] if part == "both" else [part])
    sources = [(f"{p}." if part == "both" else "", source) for p, source in by_part.items()]  # file order

    def out_dtype(info) -> torch.dtype:
        return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype

    header: dict = {"__metadata__": {"format": "pt", "scaling.part": part, "scaling.step": str(meta["step"]),
                                     "scaling.model": json.dumps(meta["model"])}}
    offset = 0
    for prefix, source in sources:
        for name, info in source.infos.items():
            nbytes = math.prod(info.shape) * out_dtype(info).itemsize
            header[prefix + name] = {"dtype": _DTYPE_CODES[out_dtype(info)], "shape": list(info.shape),
                                     "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, source in sources:  # the header's order
            for names in source.batches(READ_BYTES):
                tensors = source.read(names)
                for name in names:
                    t = tensors.pop(name).to(out_dtype(source.infos[name])).contiguous()
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, out)
    return {"path": str(out), "checkpoint": str(ckpt), "step": int(meta["step"]),
            "tensors": sum(len(source.infos) for _, source in sources), "bytes": offset}
