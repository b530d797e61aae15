"""Checkpoints are untrusted input: nothing read from one may run code.

A checkpoint folder that someone else can write to must not become a way to run their code on the
next ordinary resume, probe or conversion. Every file format the checkpoint package reads goes
through this module:

- ``.pt`` files (ours, DeepSpeed's): ``torch.load(weights_only=True)``, which unpickles only tensors
  and plain containers, plus an explicit allowlist of the few classes DeepSpeed's files hold
  (:data:`DEEPSPEED_GLOBALS`, all plain value types: enums, dataclass-like records).
- DCP's ``.metadata``: a plain pickle (``FileSystemReader.read_metadata`` calls ``pickle.load``); read
  here with an unpickler that resolves only the metadata classes of
  ``torch.distributed.checkpoint.metadata`` and a few value types (:data:`DCP_METADATA_GLOBALS`).
- DCP's data files: tensors are read by DCP with ``weights_only=True``; non-tensor items (optimizer
  hyper-parameters) go through ``LoadPlanner.load_bytes``, whose default uses ``weights_only=False``:
  :class:`SafeLoadPlanner` loads them with ``weights_only=True``.
- safetensors and JSON carry no code; YAML is read with ``yaml.safe_load``.

A refusal raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, damaged, refused, or incompatible); the message names the file."""


def _first_line(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return text[0] if text else type(exn).__name__


def _refusal(path: Path, exn: BaseException) -> CheckpointError:
    if isinstance(exn, pickle.UnpicklingError):
        # torch's weights-only unpickler explains itself over many lines; the first says what it met.
        return CheckpointError(f"{path}: refused, it holds something other than tensors and plain data "
                               f"({_first_line(exn)})")
    return CheckpointError(f"{path}: cannot be read ({type(exn).__name__}: {_first_line(exn)})")


# ----------------------------------------------------------------------------- torch.save files
def _deepspeed_globals() -> list:
    """The classes DeepSpeed's ZeRO checkpoint files pickle besides tensors and containers (all values)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_torch(path: str | Path, *, deepspeed: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True`` (plus DeepSpeed's value classes
    when ``deepspeed``); CheckpointError naming the file if it holds anything else or is damaged.
    ``mmap`` maps the file instead of reading it (tensors are read on first touch)."""
    path = Path(path)
    extra = _deepspeed_globals() if deepspeed else []
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exn:  # noqa: BLE001  (UnpicklingError, zip errors, EOF: all mean "not usable")
        raise _refusal(path, exn) from None


# ----------------------------------------------------------------------------- safetensors
@contextlib.contextmanager
def open_safetensors(path: str | Path):
    """``safetensors.safe_open`` (CPU, torch) of a checkpoint file; a file that is not one, or is cut
    short, becomes CheckpointError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (CheckpointError, AssertionError):
        raise
    except Exception as exn:  # noqa: BLE001  (SafetensorError, OSError)
        raise _refusal(Path(path), exn) from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, and its metadata."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


# ----------------------------------------------------------------------------- DCP metadata
def _dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(md, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # name -> torch.layout
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id
    allowed[("pathlib", "Path")] = pathlib.Path
    for name in dir(torch):  # dtypes are pickled as the module attribute torch.<name>
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata") from None


def load_dcp_metadata(path: str | Path):
    """A DCP ``.metadata`` file, unpickled with only the metadata classes allowed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, _dcp_metadata_globals()).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exn:  # noqa: BLE001
        raise _refusal(path, exn) from None


def dcp_reader(directory: str | Path):
    """A ``FileSystemReader`` for ``directory`` that reads metadata with :func:`load_dcp_metadata` and
    names the data file in any error."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            metadata = load_dcp_metadata(self._get_metadata_path(rank))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            opened = []  # the data file being read when something fails
            create_stream = self.fs.create_stream

            def recording(path, mode):
                opened.append(path)
                return create_stream(path, mode)

            self.fs.create_stream = recording
            try:
                return super().read_data(plan, planner)
            except CheckpointError:
                raise
            except Exception as exn:  # noqa: BLE001
                raise _refusal(Path(opened[-1] if opened else self.path), exn) from None
            finally:
                self.fs.create_stream = create_stream

    return SafeFileSystemReader(directory)


def dcp_planner():
    """DCP's default load planner, with non-tensor items read by ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except Exception as exn:  # noqa: BLE001
                raise pickle.UnpicklingError(f"item {read_item.dest_index.fqn}: {_first_line(exn)}") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()


def dcp_load(state: dict, directory: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` into ``state`` (in place) through the safe reader and planner. A refusal on any
    rank comes back as CheckpointError naming the file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=dcp_reader(directory), planner=dcp_planner(), no_dist=no_dist)
    except CheckpointException as exn:  # collective loads wrap each rank's failure
        for failure in exn.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback summary)
            if isinstance(cause, CheckpointError):
                raise CheckpointError(str(cause)) from None
        raise CheckpointError(f"{directory}: cannot be read ({_first_line(exn)})") from None
