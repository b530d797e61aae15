"""Process-group set-up from the launcher's environment (torchrun, deepspeed, SLURM via torchrun), and
what a rank says when a collective fails because another rank hung, stopped or died.

torchrun and the deepspeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; the deepspeed launcher also passes ``--local_rank``. gloo on CPU, nccl on GPU.

Timeouts (``engine.timeout_s``, docs/performance.md "Faults"): the rendezvous store and every
collective of the process group wait that long for the other ranks, then fail on the rank that
waited. gloo raises in the waiting call (a RuntimeError, "Timed out waiting 20000ms for recv
operation to complete"); NCCL's watchdog thread aborts the communicator and ends the process
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, set below unless the environment chose). On the ranks that
raise, :func:`collective_failure` turns the backend's message into one line that names the timeout
and the ranks that did not answer a roll call in the job's store (the hung or dead ones, when the
store still answers).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


class CollectiveFailure(RuntimeError):
    """A collective failed because another rank hung, stopped or died (the message is one line)."""


# The store and timeout of the process group this module started: the roll call after a failure
# needs them (torch keeps its store private).
_job: dict = {}


def env_info() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def pick_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(backend: str, device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Join the job's process group (idempotent); a world of one needs no launcher. ``timeout_s``
    (``engine.timeout_s``): how long the rendezvous and each collective wait for the other ranks."""
    info = env_info()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = pick_backend(backend, device)
        if backend == "nccl":
            # NCCL collectives are asynchronous: without error handling a timed-out one is only logged
            # and the rank waits forever. 3 (torch's default since 2.2, SkipCleanUp): the watchdog ends
            # the process after timeout_s without calling ncclCommAbort, which can itself hang on a
            # stuck peer. An explicit choice in the environment (e.g. 1, abort then exit) is kept.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        timeout = timedelta(seconds=timeout_s)
        # The env:// rendezvous init_process_group would make itself (torchrun's agent store when
        # TORCHELASTIC_USE_AGENT_STORE is set, else one hosted by rank 0), kept for the roll call.
        store, rank, world_size = next(dist.rendezvous("env://", info.rank, info.world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        # Groups made later without a timeout (DeepSpeed's data-parallel clone of the world, a 2-D
        # DeviceMesh's replicate/shard groups) take torch's backend default, 30 min, from these two
        # names (distributed_c10d._get_default_timeout): the job's timeout instead, for every group.
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = timeout
        distributed_c10d.default_pg_nccl_timeout = timeout
        _job.update(store=store, timeout_s=timeout_s, rank=rank, world_size=world_size,
                    calls=_job.get("calls", 0) + 1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)


# What gloo, NCCL and c10d say when a peer did not answer in time, or went away.
_BACKEND = re.compile(r"gloo|nccl|c10d|ProcessGroup|Watchdog", re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (?:closed|reset) by peer|broken pipe|read error|connection refused|"
                        r"socket closed|end of file", re.IGNORECASE)


def _chain(exn: BaseException):
    seen = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        yield exn
        exn = exn.__cause__ or exn.__context__


def collective_failure(exn: BaseException) -> str | None:
    """One line for ``exn`` when it is a collective that failed on the peers (a timeout, or a peer's
    connection gone), naming the ranks that did not answer the roll call; None for anything else,
    and in a process that never joined a process group here. Called after the run's clean-up has
    destroyed the group (the store is kept). Every rank that fails calls it: each waits a few seconds
    for the others' reports, so a rank that returns has heard from every rank still alive (or waited
    its grace)."""
    if not _job:
        return None
    failure = next((e for e in _chain(exn) if isinstance(e, dist.DistError)
                    or (isinstance(e, RuntimeError) and _BACKEND.search(str(e))
                        and (_TIMED_OUT.search(str(e)) or _PEER_GONE.search(str(e))))), None)
    if failure is None:
        return None
    text = str(failure)
    backend_line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(failure).__name__)
    rank, world_size = _job["rank"], _job["world_size"]
    timeout_s = _job["timeout_s"]
    missing = _roll_call(rank, world_size, grace_s=min(10.0, max(2.0, 0.1 * timeout_s)))
    if _TIMED_OUT.search(text) and not _PEER_GONE.search(text):
        what = f"a collective timed out after {timeout_s:g} s (engine.timeout_s)"
    else:
        what = "a collective failed: a peer's connection went away"
    if missing is None:
        who = "the other ranks could not be asked (the job's store did not answer: its host, rank 0 or the " \
              "launcher, may be the one that hung or died)"
    elif missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not answer " \
              "(hung, stopped or dead; their own logs or the launcher's summary say which)"
    else:
        who = "every rank answered (a network fault, or ranks that called different collectives)"
    return f"rank {rank}: {what}: {who}. The backend said: {backend_line[:300]}"


def _roll_call(rank: int, world_size: int, grace_s: float) -> list[int] | None:
    """Ranks that did not report a failure within ``grace_s`` (this rank reports itself); None when
    the store does not answer. One key per process group, appended to by each failing rank."""
    store = _job["store"]
    key = f"scaling/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_job['calls']}"
    try:
        store.set_timeout(timedelta(seconds=grace_s))
        store.append(key, f"{rank},")
        deadline = time.monotonic() + grace_s
        while True:
            reported = {int(r) for r in store.get(key).decode().split(",") if r}
            if len(reported) >= world_size or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 (any store error means the same: nobody to ask)
        return None
    return [r for r in range(world_size) if r not in reported]
