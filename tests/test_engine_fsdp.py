"""FSDP2 engine on 2 gloo ranks (CPU) against the single-process run.

Two spawns carry every distributed check (each spawn costs seconds of start-up on 2 cores):
- ``fsdp_runs``: speech (student resharded after forward) and vision (not resharded), 10 fp32 steps
  each, with collective counters and an EMA probe installed in every rank;
- ``sequence_runs``: speech stopped at step 5 (checkpoint), resumed to step 10, the same with
  ``checkpoint.async_save``, a bf16 smoke run and a hybrid-shard (``engine.replicas=2``) run, one
  after the other in the same two processes.

Speech clips are all cropped to 8000 samples (``data.speech.max_samples=8000``): with padding, the
speech model's result depends on how far a micro-batch is padded (the second positional-conv layer
sees the first layer's output at padded frames), so a global batch split 2 x 4 would differ from
1 x 8 in any engine, DDP included. Equal lengths remove padding and keep the comparison exact.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os

import pytest
import torch

from dist_harness import free_port, run_recipe, run_single, spawn

SPEECH_EQUAL_LENGTHS = "data.speech.max_samples=8000"
_COLLECTIVE_WORDS = ("gather", "scatter", "reduce", "broadcast", "barrier", "send", "recv", "all_to_all")


def _common(tmp_dir, name: str, *extra: str) -> list[str]:
    return ["train.max_steps=10", "train.precision=fp32", "train.global_batch_size=8", "tracking.enabled=false",
            "checkpoint.every_steps=100", f"checkpoint.dir={tmp_dir}/{name}", "checkpoint.resume=never", *extra]


def _fsdp(tmp_dir, name: str, *extra: str) -> list[str]:
    return _common(tmp_dir, name, "engine.name=fsdp", "train.micro_batch_size=4", *extra)


# ----------------------------------------------------------------------------- inside each rank
class _Probe:
    """Counts collectives by phase: inside ``EMATeacher.update`` ("ema") and inside
    ``FSDPEngine.backward`` ("backward", the positive control). Two independent counters: wrappers
    around every collective-like callable of ``torch.distributed`` / ``distributed_c10d`` (matched by
    substring: FSDP2 calls ``all_gather_single`` / ``reduce_scatter_single``), and ``CommDebugMode``
    (which also sees functional collectives, e.g. DTensor redistribution)."""

    def __init__(self):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        import scaling.trainer
        from scaling.engines.fsdp import FSDPEngine

        self.phase: str | None = None
        self.reset()
        for module in (distributed_c10d, dist):
            for name in dir(module):
                fn = getattr(module, name)
                if callable(fn) and not isinstance(fn, type) and any(w in name for w in _COLLECTIVE_WORDS):
                    setattr(module, name, self._counted(name, fn))

        update = scaling.trainer.EMATeacher.update

        def ema_update(teacher_tensors, student_tensors, decay):
            self.ema_calls += 1
            self.ema_teacher |= {(type(t).__name__, str(t.dtype)) for t in teacher_tensors}
            self.ema_numel = sum(t.numel() for t in teacher_tensors)
            return self._in_phase("ema", update, teacher_tensors, student_tensors, decay)

        scaling.trainer.EMATeacher.update = staticmethod(ema_update)
        backward = FSDPEngine.backward
        # CommDebugMode's module tracker raises a KeyError on activation-checkpoint recomputation in
        # backward (torch 2.14), so with checkpointing only the wrapper counter runs there.
        FSDPEngine.backward = lambda engine, loss, **kw: self._in_phase(
            "backward", backward, engine, loss, comm_debug=not engine.engine_cfg.activation_checkpointing, **kw)

    def reset(self) -> None:
        self.calls = {"ema": collections.Counter(), "backward": collections.Counter()}
        self.comm_debug = {"ema": 0, "backward": 0}
        self.ema_calls = 0
        self.ema_teacher = set()  # (type, dtype) of the tensors the EMA updates
        self.ema_numel = 0

    def _counted(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.phase is not None:
                self.calls[self.phase][name] += 1
            return fn(*args, **kwargs)

        return counted

    def _in_phase(self, phase, fn, *args, comm_debug: bool = True, **kwargs):
        from torch.distributed.tensor.debug import CommDebugMode

        self.phase = phase
        try:
            with CommDebugMode() if comm_debug else contextlib.nullcontext() as cdm:
                out = fn(*args, **kwargs)
        finally:
            self.phase = None
        if cdm is not None:
            self.comm_debug[phase] += cdm.get_total_counts()
        return out

    def summary(self) -> dict:
        return {"calls": {k: dict(v) for k, v in self.calls.items()}, "comm_debug": dict(self.comm_debug),
                "ema_calls": self.ema_calls, "ema_teacher": sorted(self.ema_teacher), "ema_numel": self.ema_numel}


def _run_jobs(jobs: list[tuple], ports: list[int]) -> list[dict]:
    """Several runs, one after the other, in this rank; each later run joins a new process group."""
    probe = _Probe()
    results = []
    for i, (modality, overrides, stop_at_step) in enumerate(jobs):
        if i:
            os.environ["MASTER_PORT"] = str(ports[i - 1])
        probe.reset()
        result = run_recipe(modality, overrides, stop_at_step)
        result["probe"] = probe.summary()
        results.append(result)
    return results


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def refs(tmp_dir):
    return {
        "speech": run_single("speech", _common(tmp_dir, "ref-speech", "train.micro_batch_size=8",
                                               SPEECH_EQUAL_LENGTHS)),
        "vision": run_single("vision", _common(tmp_dir, "ref-vision", "train.micro_batch_size=8")),
    }


@pytest.fixture(scope="module")
def fsdp_runs(tmp_dir):
    jobs = [("speech", _fsdp(tmp_dir, "speech", SPEECH_EQUAL_LENGTHS, "engine.reshard_after_forward=true"), None),
            ("vision", _fsdp(tmp_dir, "vision", "engine.reshard_after_forward=false"), None)]
    ranks = spawn(_run_jobs, jobs, [free_port() for _ in jobs[1:]])
    return {"speech": [r[0] for r in ranks], "vision": [r[1] for r in ranks]}


@pytest.fixture(scope="module")
def sequence_runs(tmp_dir):
    resume = _fsdp(tmp_dir, "resume", SPEECH_EQUAL_LENGTHS, "checkpoint.every_steps=5")
    async_resume = _fsdp(tmp_dir, "async", SPEECH_EQUAL_LENGTHS, "checkpoint.every_steps=5", "checkpoint.async_save=true")
    jobs = [("speech", resume, 5),
            ("speech", resume + ["checkpoint.resume=auto"], None),
            ("speech", async_resume, 5),
            ("speech", async_resume + ["checkpoint.resume=auto"], None),
            ("speech", _fsdp(tmp_dir, "bf16", SPEECH_EQUAL_LENGTHS, "train.precision=bf16"), 3),
            ("speech", _fsdp(tmp_dir, "hsdp", SPEECH_EQUAL_LENGTHS, "engine.replicas=2",
                             "engine.activation_checkpointing=true", "train.micro_batch_size=2"), 3)]
    ranks = spawn(_run_jobs, jobs, [free_port() for _ in jobs[1:]])
    return dict(zip(["stopped", "resumed", "async_stopped", "async_resumed", "bf16", "hsdp"], zip(*ranks)))


def _teacher(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("teacher.")}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("modality", ["speech", "vision"])  # speech: reshard_after_forward true; vision: false
def test_fsdp_matches_single_process(refs, fsdp_runs, modality):
    ref, ranks = refs[modality], fsdp_runs[modality]
    for r in ranks:  # every rank logs the global loss
        assert r["num_masked"] == ref["num_masked"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0)
    gathered = ranks[0]["state"]
    assert ranks[1]["state"] == {}  # full tensors land on rank 0 only
    assert set(gathered) == set(ref["state"])  # same names as the single engine (student.* and teacher.*)
    teacher = _teacher(ref["state"])
    assert len(teacher) == sum(1 for k in ref["state"] if k.startswith("student.encoder."))
    for k in teacher:
        assert gathered[k].dtype == torch.float32
        torch.testing.assert_close(gathered[k], ref["state"][k], rtol=0, atol=1e-5, msg=k)
    # the teacher moved: it is neither its initial copy nor the student
    k = next(k for k in teacher if k.endswith("fc1.weight"))
    assert (gathered[k] - gathered["student." + k[len("teacher."):]]).abs().max() > 1e-4


@pytest.mark.parametrize("modality", ["speech", "vision"])
def test_no_collective_during_ema(fsdp_runs, modality):
    for r in fsdp_runs[modality]:
        p = r["probe"]
        assert p["ema_calls"] == 10
        assert p["calls"]["ema"] == {} and p["comm_debug"]["ema"] == 0, p
        # positive control: the same counters see FSDP's reduce-scatters in backward
        assert sum(n for name, n in p["calls"]["backward"].items() if "reduce_scatter" in name) > 0, p
        assert p["comm_debug"]["backward"] > 0, p
        # the EMA runs on plain fp32 local shards
        assert p["ema_teacher"] == [("Tensor", "torch.float32")]


def test_teacher_memory_is_sharded(refs, fsdp_runs):
    one = refs["speech"]["memory"]["memory/rank0/teacher_bytes"]
    ranks = fsdp_runs["speech"]
    mem = ranks[0]["memory"]
    per_rank = [mem[f"memory/rank{r}/teacher_bytes"] for r in range(2)]
    assert all(b <= 0.55 * one for b in per_rank), (per_rank, one)
    assert sum(per_rank) == one  # the shards cover the teacher once
    for kind in ("params", "grads", "optimizer"):
        full = refs["speech"]["memory"][f"memory/rank0/{kind}_bytes"]
        assert all(mem[f"memory/rank{r}/{kind}_bytes"] <= 0.55 * full for r in range(2)), kind
    # fp32: the EMA's local tensors hold exactly this rank's teacher bytes / 4
    for r, result in enumerate(ranks):
        assert result["probe"]["ema_numel"] * 4 == per_rank[r]


def test_resume_from_sharded_checkpoint(tmp_dir, fsdp_runs, sequence_runs):
    full = fsdp_runs["speech"]
    stopped, resumed = sequence_runs["stopped"], sequence_runs["resumed"]
    for r in range(2):
        assert stopped[r]["step"] == 5 and resumed[r]["step"] == 10
        torch.testing.assert_close(torch.tensor(stopped[r]["losses"]), torch.tensor(full[r]["losses"][:5]),
                                   rtol=0, atol=1e-6)
        assert len(resumed[r]["losses"]) == 5  # steps 6-10 only
        torch.testing.assert_close(torch.tensor(resumed[r]["losses"]), torch.tensor(full[r]["losses"][5:]),
                                   rtol=0, atol=1e-6)
    assert set(resumed[0]["state"]) == set(full[0]["state"])
    for k, v in full[0]["state"].items():
        torch.testing.assert_close(resumed[0]["state"][k], v, rtol=0, atol=1e-6, msg=k)
    step5 = tmp_dir / "resume" / "step_00000005"
    assert (step5 / "dcp").is_dir() and (step5 / "scheduler.pt").is_file()


def test_async_save_writes_the_same_checkpoint_and_resumes_exactly(tmp_dir, fsdp_runs, sequence_runs):
    from scaling.checkpoint import read_state_dict

    full = fsdp_runs["speech"]
    for r in range(2):
        assert sequence_runs["async_stopped"][r]["step"] == 5
        torch.testing.assert_close(torch.tensor(sequence_runs["async_resumed"][r]["losses"]),
                                   torch.tensor(full[r]["losses"][5:]), rtol=0, atol=1e-6)
    for part in ("student", "teacher"):  # written in the background, the same bytes as a blocking save
        sync, background = (read_state_dict(tmp_dir / name / "step_00000005", part) for name in ("resume", "async"))
        assert sync.keys() == background.keys() and all(torch.equal(sync[k], background[k]) for k in sync)
    # Both background saves completed: no step folder left behind as .tmp (run.json is the run's summary).
    assert sorted(p.name for p in (tmp_dir / "async").iterdir()) == ["run.json", "step_00000005", "step_00000010"]


def test_bf16_smoke(fsdp_runs, sequence_runs):
    fp32, bf16 = fsdp_runs["speech"][0], sequence_runs["bf16"][0]
    assert len(bf16["losses"]) == 3 and all(torch.isfinite(torch.tensor(bf16["losses"])))
    assert abs(bf16["losses"][0] - fp32["losses"][0]) <= 0.03 * fp32["losses"][0]
    for r in sequence_runs["bf16"]:  # master shards and teacher stay fp32 under the bf16 policy
        assert r["probe"]["ema_teacher"] == [("Tensor", "torch.float32")]
        assert r["probe"]["calls"]["ema"] == {}
    assert all(v.dtype == torch.float32 for v in bf16["state"].values())


def test_hybrid_shard_checkpointing_accumulation(fsdp_runs, sequence_runs):
    # replicas=2 on 2 ranks: a (replicate=2, shard=1) mesh, with activation checkpointing and 2 micro-batches
    # of 2 per rank (gradient sync on the last only): the same losses as the plain sharded run
    full = fsdp_runs["speech"][0]
    for r in sequence_runs["hsdp"]:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(full["losses"][:3]), rtol=1e-4, atol=0)
        assert r["probe"]["calls"]["ema"] == {}
    assert set(sequence_runs["hsdp"][0]["state"]) == set(full["state"])  # checkpoint wrappers leave names alone
    mem = sequence_runs["hsdp"][0]["memory"]
    assert mem["memory/rank0/teacher_bytes"] == mem["memory/rank1/teacher_bytes"]  # replicated, not sharded


def test_replicas_must_divide_world(monkeypatch):
    from scaling.config import EngineConfig, TrainConfig
    from scaling.engines.fsdp import FSDPEngine

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="engine.replicas"):
        FSDPEngine(EngineConfig(name="fsdp", replicas=3), TrainConfig(precision="fp32", device="cpu"))
