"""Our training step against a plain one written on HF transformers (benchmarks/hf_step.py), from the
same weights on the same batches: the loss of step 1 and, after one AdamW update and one EMA update
on each side, the loss of step 2.

Ours is ``scaling.pretrain.run`` (single engine, fp32) on each modality's tiny recipe; its student
starts from ``build_model`` under the recipe's seed, which is what ``run`` builds, and the plain
step starts from those weights exported with our HF adapters. The batches are the run's own: the
loader with the run's seed. Speech clips all have one length (no padding), where HF's model and
ours are the same function (docs/hf-transformers.md).

Tolerances. Step 1: rel 1e-5. Both sides compute the same fp32 math in a different order (SDPA
with a bool mask against HF's attention path, separate against fused norms, other summation
orders), about 1e-6 relative per layer output (docs/hf-transformers.md, measured up to 5e-6 on the
tiny models); the loss averages such differences over thousands of elements. Step 2: rel 1e-4.
Adam's first update is about lr x sign(g) per element, so an element whose gradient is near zero
on one side can move the other way on the other; the loss after the update inherits a little of
that, besides step 1's roundoff.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.hf_step import PlainHFStep  # noqa: E402
from scaling.config import load_recipe  # noqa: E402
from scaling.data import build_loader  # noqa: E402
from scaling.models import build_model  # noqa: E402
from scaling.plan import resolve  # noqa: E402
from scaling.pretrain import run  # noqa: E402

BATCH = 8
STEPS = 2
# The full LR from step 0 (no warm-up) and a fast teacher: the first update moves the student and the
# teacher enough for step 2's loss to tell a wrong update or a wrong EMA scope from a right one.
UPDATE = ["schedule.warmup_steps=1", "ema.decay=0.5", "ema.end_decay=0.5"]
# Per modality: what makes the tiny recipe's batch small and, for speech, unpadded (every clip 1 s).
EXTRA = {"speech": ["data.speech.min_samples=16000", "data.speech.max_samples=16000"], "vision": [], "text": []}


def recipe_for(modality: str, tmp_path: Path):
    return load_recipe(REPO / "recipes" / modality / "tiny.yaml", [
        "train.precision=fp32", "train.device=cpu", "engine.name=single", f"train.global_batch_size={BATCH}",
        f"train.micro_batch_size={BATCH}", f"train.max_steps={STEPS}", "tracking.enabled=false",
        "checkpoint.every_steps=100", f"checkpoint.dir={tmp_path}/run", *UPDATE, *EXTRA[modality]])


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_first_two_losses_equal_the_plain_hf_step(modality, tmp_path):
    recipe = resolve(recipe_for(modality, tmp_path), 1, read_data=False).resolved()
    history = run(recipe).history

    torch.manual_seed(recipe.seed)  # run() seeds the same way right before build_model
    state = build_model(recipe.model).state_dict()
    plain = PlainHFStep(recipe, state)
    loader = build_loader(recipe.data, recipe.model, recipe.masking, seed=recipe.seed, rank=0, world_size=1,
                          micro_batch_size=BATCH)
    batches = [next(loader) for _ in range(STEPS)]
    if modality == "speech":
        assert not any(b["audio_padding_BT"].any() for b in batches)
    if modality == "text":  # the text batches are padded: HF's attention mask must keep real tokens equal
        assert all(b["padding_mask_BT"].any() for b in batches)
    plain_losses = [float(plain.step([b])) for b in batches]

    ours = [h.loss for h in history]
    print(f"{modality}: ours {ours}, plain HF {plain_losses}, "
          f"rel diff {[abs(a - b) / abs(b) for a, b in zip(ours, plain_losses)]}")
    assert [h.num_masked for h in history] == [int(b["mask_BT"].sum()) for b in batches]
    assert ours[0] == pytest.approx(plain_losses[0], rel=1e-5)
    assert ours[1] == pytest.approx(plain_losses[1], rel=1e-4)
    # Batch 2 on the initial weights: the update moved the loss by far more than the tolerance, so
    # step 2 checks the update (and the EMA that made its targets), not only the forward again.
    not_updated = float(PlainHFStep(recipe, state).step([batches[1]]))
    print(f"{modality}: step 2 without the update {not_updated} (rel {abs(ours[1] - not_updated) / abs(not_updated):.1e})")
    assert abs(ours[1] - not_updated) > 5 * 1e-4 * abs(not_updated)
