"""``engine.compile: true`` (``torch.compile`` of every encoder block, ``scaling.engines.base.prepare_blocks``)
against eager runs of the same recipe.

What is compared, and with what tolerance. Inductor (CPU, C++ kernels) fuses and reorders float
operations (layer-norm and softmax reductions, the GELU, matmul epilogues), so a compiled block
rounds differently from eager; both are fp32. Measured on the tiny recipes (5 steps, fp32): losses
within 1e-7 relative, every student and teacher tensor within 6e-8 absolute (an fp32 ulp at these
magnitudes). The tolerances below (losses rtol 1e-5; tensors rtol 1e-5 + atol 1e-5) leave a factor
of 100 for other CPUs and SIMD widths and no more: weights frozen into the teacher's compiled graph
(inductor ``freezing``: a stale teacher, the EMA no longer reaching it) moved the speech and vision
losses by 2e-5 and 9e-5 relative within these 5 steps, caught at 1e-5 and missed at 1e-4 (text's
teacher, EMA 0.9999, moves too little in 5 steps for any test to see). Weights frozen into the
student or a parameter left without gradient would move that parameter by about an optimizer step
(lr 1e-3..3e-3), and a dropped padding mask the losses at once: far beyond.

Runs (each compiled run starts from ``torch._dynamo.reset()``, so its graph count is its own):
- single engine: speech, text (with activation checkpointing) and vision, eager and compiled;
- one 2-rank spawn (gloo): fsdp speech (activation checkpointing) and fsdp vision, eager and
  compiled, then ZeRO-2 text compiled (DeepSpeed's engine comes last: a second one in a process fails).

Budget: every compiled graph is first compiled in this process and reaches the spawned ranks
through inductor's on-disk caches (FX graph and AOT autograd cache, default directory): speech and
text share one post-LN graph (batch and length are marked dynamic in both), the checkpointed text
graph serves fsdp speech and ZeRO-2 text, vision's static graph for micro-batches of 4 serves fsdp
vision. Measured on 2 cores (load about 1): 38 s with the cache warm, 70 s from an empty cache
directory (about 45 C++ kernels to build); a loaded machine compiles several times slower.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from dist_harness import assert_same_run, free_port, run_recipe, run_single, spawn

STEPS = 5
LOSS_RTOL = 1e-5
TENSOR_TOL = dict(rtol=1e-5, atol=1e-5)
# Activation checkpointing in the single text run: its compiled graph (recomputation inside) is the one
# fsdp speech and ZeRO-2 text use from the cache; single speech and both vision runs go without.
SINGLE = {"speech": [], "text": ["engine.activation_checkpointing=true"], "vision": []}
FSDP = {"speech": ["engine.activation_checkpointing=true"], "vision": []}
ZERO2_TEXT = ["engine.name=deepspeed", "engine.zero_stage=2", "engine.activation_checkpointing=true"]


def _overrides(tmp_dir, name: str, *extra: str) -> list[str]:
    # Micro-batches of 4 everywhere (single: 2 per step; 2 ranks: 1 per rank), so that single and
    # sharded runs compile the same block shapes (vision is static) and share the cache.
    return [f"train.max_steps={STEPS}", "train.precision=fp32", "train.global_batch_size=8",
            "train.micro_batch_size=4", "tracking.enabled=false", "checkpoint.every_steps=100",
            f"checkpoint.dir={tmp_dir}/{name}", "checkpoint.resume=never", *extra]


def _graphs_traced(fn, *args):
    """``fn(*args)`` from an empty dynamo cache; returns (result, graphs dynamo traced meanwhile)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    result = fn(*args)
    return result, counters["stats"]["unique_graphs"] - before


def _compiled(run, modality: str, overrides: list[str]) -> dict:
    result, graphs = _graphs_traced(run, modality, overrides + ["engine.compile=true"])
    result["graphs"] = graphs
    return result


def _rank_jobs(jobs: list[tuple[str, list[str], bool]], ports: list[int]) -> list[dict]:
    """In each rank: ``(modality, overrides, compile)`` runs one after the other, each later run on a
    new process group (``ports``)."""
    results = []
    for i, (modality, overrides, compiled) in enumerate(jobs):
        if i:
            os.environ["MASTER_PORT"] = str(ports[i - 1])
        results.append(_compiled(run_recipe, modality, overrides) if compiled else run_recipe(modality, overrides))
    return results


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compile")


@pytest.fixture(scope="module")
def single_runs(tmp_dir):
    runs = {}
    for modality, extra in SINGLE.items():
        eager = run_single(modality, _overrides(tmp_dir, f"{modality}-eager", *extra))
        runs[modality] = eager, _compiled(run_single, modality, _overrides(tmp_dir, f"{modality}-compiled", *extra))
    return runs


@pytest.fixture(scope="module")
def spawned_runs(tmp_dir, single_runs):  # after the single runs: their compiled graphs are in the cache
    jobs = []
    for modality, extra in FSDP.items():
        fsdp = ["engine.name=fsdp", *extra]
        jobs += [(modality, _overrides(tmp_dir, f"fsdp-{modality}-eager", *fsdp), False),
                 (modality, _overrides(tmp_dir, f"fsdp-{modality}-compiled", *fsdp), True)]
    jobs.append(("text", _overrides(tmp_dir, "zero2-text-compiled", *ZERO2_TEXT), True))
    ranks = spawn(_rank_jobs, jobs, [free_port() for _ in jobs[1:]])
    runs = {f"fsdp-{modality}": ([r[2 * i] for r in ranks], [r[2 * i + 1] for r in ranks])
            for i, modality in enumerate(FSDP)}
    runs["zero2-text"] = [r[-1] for r in ranks]
    return runs


def _assert_same_result(eager: dict, compiled: dict) -> None:
    assert compiled["num_masked"] == eager["num_masked"]
    assert len(compiled["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=LOSS_RTOL, atol=0)
    # Module.compile compiles in place: the same names, in the same order, student and teacher alike.
    assert list(compiled["state"]) == list(eager["state"])
    assert any(k.startswith("student.encoder.blocks.") for k in eager["state"])
    assert any(k.startswith("teacher.encoder.blocks.") for k in eager["state"])
    for k, v in eager["state"].items():
        torch.testing.assert_close(compiled["state"][k], v, **TENSOR_TOL, msg=k)


# ----------------------------------------------------------------------------- single engine
@pytest.mark.parametrize("modality", list(SINGLE))
def test_compiled_run_matches_eager(single_runs, modality):
    eager, compiled = single_runs[modality]
    _assert_same_result(eager, compiled)


@pytest.mark.parametrize("modality", list(SINGLE))
def test_one_graph_per_mode_for_all_blocks_and_batches(single_runs, modality):
    """Two graphs (student training, teacher under no_grad) serve every block and micro-batch of a
    run: 10 micro-batches, whose speech and text lengths vary, trace nothing more. Also the proof that
    the blocks ran compiled at all (eager traces none)."""
    assert single_runs[modality][1]["graphs"] == 2


def test_lengths_that_vary_trace_one_graph():
    """Speech teacher blocks on three [B, T] shapes (a length equal to D among them: with
    ``dynamic=True`` it would be unified with D and specialised): one graph (prepare_blocks' pre-hook
    marks B and T dynamic), outputs as eager, blocks compiled in place (``_compiled_call_impl``) with
    the eager model's parameter names."""
    from scaling.config import EngineConfig, load_recipe
    from scaling.engines.base import prepare_blocks
    from scaling.models import build_model
    from scaling.teacher import EMATeacher
    from dist_harness import REPO

    cfg = load_recipe(REPO / "recipes" / "speech" / "tiny.yaml", []).model
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = EMATeacher(student.encoder)
    eager_student, eager_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    prepare_blocks(student, teacher, EngineConfig(compile=True))
    for encoder in (student.encoder, teacher.encoder):
        assert all(block._compiled_call_impl is not None for block in encoder.blocks)
    assert all(block._compiled_call_impl is None for block in eager_teacher.encoder.blocks)
    assert list(student.state_dict()) == list(eager_student.state_dict())
    assert list(teacher.state_dict()) == list(eager_teacher.state_dict())

    def forward_all():
        for B, T in ((4, 50), (3, cfg.dim), (5, 71)):
            x = torch.randn(B, T, cfg.dim)
            padding = torch.arange(T)[None, :] >= torch.randint(T // 2, T + 1, (B,))[:, None]
            kw = dict(padding_mask_BT=padding, num_taps=2, tap="ffn")
            out, ref = teacher(x, **kw), eager_teacher(x, **kw)
            for a, b in zip(out.taps + [out.x_BTD], ref.taps + [ref.x_BTD]):
                torch.testing.assert_close(a, b, **TENSOR_TOL)

    assert _graphs_traced(forward_all)[1] == 1


def test_drop_path_rates_share_one_graph():
    """BEiT's drop-path rate differs per block: read as a float it would be a graph constant, one
    graph per block (12 in vision base: dynamo's recompile limit, an error with fullgraph). Compiled,
    blocks with rates 0.1..0.4 share one training graph, and each still drops its rate of samples and
    scales the kept ones by 1/(1-p) (compared with the binomial spread of 4,000 samples)."""
    from scaling.models.blocks import DropPath

    rates = (0.1, 0.2, 0.3, 0.4)
    layers = [DropPath(p) for p in rates]
    for layer in layers:
        layer.compile(fullgraph=True)
    x = torch.ones(4000, 3)

    def forward_all():
        return [layer(x) for layer in layers]

    outs, graphs = _graphs_traced(forward_all)
    assert graphs == 1
    for p, out in zip(rates, outs):
        kept = out[:, 0] != 0
        assert torch.equal(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
        assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
        spread = 4 * (p * (1 - p) / len(x)) ** 0.5  # 4 standard deviations
        assert abs((~kept).float().mean().item() - p) < spread, p


def test_zero3_refuses_compile():
    from scaling.config import EngineConfig, TrainConfig
    from scaling.engines.deepspeed import DeepSpeedEngine

    with pytest.raises(ValueError, match="zero_stage 3"):
        DeepSpeedEngine(EngineConfig(name="deepspeed", zero_stage=3, compile=True), TrainConfig())


# ----------------------------------------------------------------------------- 2 ranks
@pytest.mark.parametrize("modality", list(FSDP))
def test_fsdp_compiled_run_matches_eager(spawned_runs, modality):
    eager_ranks, compiled_ranks = spawned_runs[f"fsdp-{modality}"]
    gathered = [r for r in eager_ranks + compiled_ranks if r["state"]]
    assert len(gathered) == 2  # rank 0 of each run holds the gathered full state
    _assert_same_result(*gathered)
    for eager, compiled in zip(eager_ranks, compiled_ranks):
        assert compiled["losses"] == compiled_ranks[0]["losses"]
        torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]),
                                   rtol=LOSS_RTOL, atol=0)
        assert compiled["graphs"] == 2


def test_zero2_compiled_run_matches_single_eager(single_runs, spawned_runs):
    # Against the eager single run (a second DeepSpeed engine cannot start in the ranks): the engines'
    # own difference (test_engine_deepspeed: rtol 1e-4, teacher atol 1e-5) bounds this one.
    assert_same_run(single_runs["text"][0], spawned_runs["zero2-text"])
    assert all(r["graphs"] == 2 for r in spawned_runs["zero2-text"])


# ----------------------------------------------------------------------------- data2vec 2.0
@pytest.mark.parametrize("modality", ["vision", "speech"])
def test_v2_compiled_run_matches_eager(tmp_dir, modality):
    """2.0 blocks compiled (student on the kept positions of M views; speech with ALiBi biases over lengths
    that vary) give the eager run's losses and weights; a few graphs serve the run (the speech student's
    [R, H, K, K] biases add one automatic-dynamic retrace)."""
    name = f"{modality}/v2-tiny"
    eager = run_single(name, _overrides(tmp_dir, f"v2-{modality}-eager"))
    compiled = _compiled(run_single, name, _overrides(tmp_dir, f"v2-{modality}-compiled"))
    _assert_same_result(eager, compiled)
    assert 2 <= compiled["graphs"] <= 4, compiled["graphs"]
