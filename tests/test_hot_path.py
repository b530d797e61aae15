"""The hot path: one gradient all-reduce per optimizer step under DDP, and one host sync in a step
(the engine's skip/stop flags, scaling/engines/base.py ``Engine.step``).

The sync count on CPU: every Python-level read of a tensor's value on the host (``.item()``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``float()``/``int()``/``bool()``) made from the step's device-side
code (the trainer, the engines, the models, the objective, the teacher) is counted. On a GPU each of
those drains the device's queue. The host stage (``scaling.flops.batch_counts`` and the data pipeline,
which read CPU batches before they move) is outside the count by design. Reads inside torch (e.g.
boolean indexing) are not visible here; benchmarks/gpu_check.py runs the same steps under
``torch.cuda.set_sync_debug_mode`` on a GPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from dist_harness import REPO, free_port, spawn

sys.path.insert(0, str(REPO / "benchmarks"))

STEP_CODE = [str(REPO / "scaling" / p) for p in ("trainer.py", "engines", "models", "objective.py", "teacher.py",
                                                 "optim.py", "rankme.py")]
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def test_ddp_all_reduces_gradients_once_per_optimizer_step(tmp_path):
    from ddp_traffic import jobs  # benchmarks/ddp_traffic.py: the same counted runs, as a benchmark

    acc1, acc4 = spawn(jobs, str(REPO / "recipes/vision/tiny.yaml"), 3, 8, str(tmp_path), [free_port()])[0]
    for job in (acc1, acc4):
        # every gradient byte crosses once per step, whatever the accumulation
        assert job["bytes"] == job["grad_bytes"] * job["steps"], job
    assert acc4["calls"] == acc1["calls"]  # the same buckets, once per step, not once per micro-batch
    torch.testing.assert_close(torch.tensor(acc4["losses"]), torch.tensor(acc1["losses"]), rtol=1e-5, atol=0)


class HostReads:
    """Counts host reads of tensor values made from the step's device-side code, per optimizer step."""

    def __init__(self):
        self.by_step: Counter = Counter()
        self.where: dict[int, list[str]] = {}
        self.step = 0

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        reads = self

        def read(t, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(caller.startswith(p) for p in STEP_CODE):
                reads.by_step[reads.step] += 1
                reads.where.setdefault(reads.step, []).append(f"{name} in {Path(caller).name}:"
                                                              f"{sys._getframe(1).f_lineno}")
            return original(t, *args, **kwargs)

        return read


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_a_step_reads_nothing_on_the_host_outside_log_steps(tmp_path, modality):
    from scaling.config import load_recipe
    from scaling.pretrain import run
    from scaling.trainer import Trainer

    reads = HostReads()
    train_step, read = Trainer.train_step, Trainer.read

    def counted_step(self, *args, **kwargs):
        reads.step = self.step + 1
        with reads:
            return train_step(self, *args, **kwargs)

    def counted_read(self, *args, **kwargs):
        with reads:
            return read(self, *args, **kwargs)

    recipe = load_recipe(REPO / f"recipes/{modality}/tiny.yaml", [
        "train.max_steps=6", "train.log_every=3", "train.precision=fp32", "train.global_batch_size=4",
        "train.micro_batch_size=2", "tracking.enabled=false", "checkpoint.every_steps=100",
        f"checkpoint.dir={tmp_path}/ckpt"])
    Trainer.train_step, Trainer.read = counted_step, counted_read
    try:
        result = run(recipe)
    finally:
        Trainer.train_step, Trainer.read = train_step, read
    assert len(result.history) == 6 and all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    # Outside log steps the one read is Engine.step's: whether to skip the optimizer step (a non-finite
    # loss or gradient norm) and whether a rank was signalled to stop, one all-reduced pair of flags.
    quiet = {s: reads.where.get(s) for s in (1, 2, 4, 5)}
    assert all(reads.by_step[s] == 1 and reads.where[s][0].startswith("tolist in base.py") for s in quiet), quiet
    # Log steps read: the window (read()) and the measured statistics (RankMe's SVD on rank 0).
    assert reads.by_step[3] > 0 and reads.by_step[6] > 0
