"""Data layer: webdataset shards (or a synthetic source) -> masked micro-batches with exact resume."""

from scaling.data.loader import Loader, build_loader
from scaling.data.shards import (
    encode_speech_sample,
    encode_text_sample,
    encode_vision_sample,
    expand_shards,
    write_shards,
)

__all__ = [
    "Loader",
    "build_loader",
    "write_shards",
    "expand_shards",
    "encode_speech_sample",
    "encode_vision_sample",
    "encode_text_sample",
]
