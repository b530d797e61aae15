"""Speech batches by seconds of audio: padding share and training speed, bucketed vs fixed-count.

Writes a real shard set (``scaling.data.shards.write_shard_set``) of synthetic clips whose lengths
are uniform in 2-20 s (LibriSpeech-like; low-amplitude tones plus noise, so FLAC stays small and
fast), then reads it with the real loader (``build_loader``) two ways:

- bucketed: ``max_batch_audio_samples`` = ``--batch-seconds`` x the sample rate, no bound on utterances,
  sorted inside the recipe's shuffle window (``data.shuffle_buffer``);
- fixed-count: ``micro_batch_size`` = the bucketed run's mean utterances per batch, i.e. the same
  mean real audio per batch.

Padding share = padded samples / all samples of the batch tensor (``B x longest``), per batch
(mean) and over the epoch. The same sizes are then planned with other windows (pure planning,
:func:`scaling.data.bucketing.plan_window`, no loader) to show what the window buys.

Training speed: the tiny speech recipe's model (``recipes/speech/tiny.yaml``: 64-channel CNN with the
full 320x stride, 4 blocks of width 64), two copies from the same init with their own EMA teacher
and AdamW, fed the first ``--steps`` batches of each stream (prefetched, so only the step is timed),
alternating step by step (``--blocks``) so that machine noise hits both alike. One step = one
micro-batch (forward, backward, optimizer, EMA update; the trainer's loss: top-K averaged teacher
layers at the masked positions).
Reported: utterances/s, seconds of real audio per second, and seconds of padded audio per second.

Sample rate: 4 kHz by default (``--sample-rate 16000`` for the real one). At 16 kHz one step of 80 s
of audio takes about 12 s on 2 CPU cores, too slow for a few-minute run; every length, the crop
(``data.speech.max_samples`` = 20 s) and the budget scale with the rate, so the padding shares and
the bucketed/fixed ratios are the same, while the model sees 4x fewer samples per second of audio.

    python benchmarks/speech_padding.py [--clips 300] [--steps 16] [--batch-seconds 80] [--sample-rate 4000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaling.config import load_recipe  # noqa: E402
from scaling.data import build_loader  # noqa: E402
from scaling.data.bucketing import plan_window  # noqa: E402
from scaling.data.shards import encode_speech_sample, write_shard_set  # noqa: E402

SR = 4000  # set from --sample-rate in main()
PAD_TARGET = 0.05


def clips(count: int, lengths: list[int], seed: int = 0):
    """``count`` encoded clips of uniform 2-20 s: two quiet tones and a noise floor (lengths appended to ``lengths``)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(2 * SR, 20 * SR + 1))
        lengths.append(n)
        t = np.arange(n, dtype=np.float32) / SR
        f1, f2 = rng.uniform(100, 0.4 * SR, size=2)
        audio = 0.02 * np.sin(2 * np.pi * f1 * t) + 0.01 * np.sin(2 * np.pi * f2 * t)
        audio += 0.002 * rng.standard_normal(n).astype(np.float32)
        yield encode_speech_sample(f"clip{i:05d}", audio.astype(np.float32), SR)


def batch_stats(b: dict) -> tuple[int, int, int]:
    """(utterances, real samples, padded-tensor samples) of a batch."""
    real = int((~b["audio_padding_BT"]).sum())
    return b["audio_BT"].shape[0], real, b["audio_BT"].numel()


def epoch_stats(recipe, **kw) -> list[tuple[int, int, int]]:
    L = build_loader(recipe.data, recipe.model, recipe.masking, seed=0, rank=0, world_size=1, epochs=1, **kw)
    out = [batch_stats(b) for b in L]
    L.close()
    return out


def pad_shares(stats) -> tuple[float, float]:
    """(mean per-batch padding share, padding share over all batches)."""
    per_batch = statistics.fmean(1 - real / total for _, real, total in stats)
    overall = 1 - sum(s[1] for s in stats) / sum(s[2] for s in stats)
    return per_batch, overall


class Model:
    """A student, its EMA teacher and AdamW: one data2vec training step per micro-batch."""

    def __init__(self, recipe, student):
        from scaling.teacher import EMATeacher

        self.recipe, self.student = recipe, student
        self.teacher = EMATeacher(student.encoder)
        self.opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=recipe.optim.lr)

    def step(self, batch: dict) -> float:
        from scaling.objective import make_targets, regression_loss
        from scaling.teacher import EMATeacher

        obj = self.recipe.objective
        out = self.student(batch)
        taps = self.teacher(out.teacher_x, padding_mask_BT=out.padding_mask_BT, num_taps=obj.top_k, tap=obj.tap).taps
        target_ND = make_targets(taps, obj, out.padding_mask_BT)[out.mask_BT]
        loss = regression_loss(out.pred_ND, target_ND, obj) / max(1, int(batch["mask_BT"].sum()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.recipe.optim.grad_clip or 1e9)
        self.opt.step()
        s = [p.detach() for p in self.student.encoder.parameters()]
        t = [p.detach() for p in self.teacher.parameters()]
        EMATeacher.update(t, s, self.recipe.ema.decay)
        return float(loss.detach())


def first_batches(recipe, n: int, **kw) -> list[dict]:
    L = build_loader(recipe.data, recipe.model, recipe.masking, seed=0, rank=0, world_size=1, **kw)
    out = [next(L) for _ in range(n)]
    L.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=300)
    p.add_argument("--steps", type=int, default=16, help="timed training steps per batching (multiple of --blocks)")
    p.add_argument("--blocks", type=int, default=16, help="interleaved timing blocks (= --steps: alternate every step)")
    p.add_argument("--batch-seconds", type=float, default=80.0, help="bucketed budget of padded audio per batch")
    p.add_argument("--sample-rate", type=int, default=4000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    global SR
    SR = args.sample_rate
    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="speech_padding_"))
    t0 = time.perf_counter()
    lengths: list[int] = []
    index = write_shard_set(str(work / "shards"), clips(args.clips, lengths), samples_per_shard=50)
    spec = str(work / "shards" / index["spec"])
    t_write = time.perf_counter() - t0
    budget = int(args.batch_seconds * SR)
    recipe = load_recipe(REPO / "recipes" / "speech" / "tiny.yaml", [
        f"data.train_shards={spec}", f"data.speech.sample_rate={SR}", f"data.speech.max_samples={20 * SR}",
        f"data.speech.min_samples={2 * SR}", "data.shuffle_buffer=256", "tracking.enabled=false"])
    K = recipe.data.shuffle_buffer

    bucketed = epoch_stats(recipe, micro_batch_size=0, max_batch_audio_samples=budget)
    mean_utts = sum(s[0] for s in bucketed) / len(bucketed)
    mb = max(1, round(mean_utts))
    fixed = epoch_stats(recipe, micro_batch_size=mb)
    audio_s = sum(s[1] for s in bucketed) / SR
    print(f"[padding] {args.clips} clips at {SR} Hz, {audio_s / 3600:.2f} h of audio, {index['num_bytes'] / 2**20:.0f} MiB of "
          f"shards (written in {t_write:.1f} s); window {K}, budget {budget} samples ({args.batch_seconds:g} s)")
    rows = {}
    for name, stats in (("bucketed", bucketed), (f"fixed {mb}", fixed)):
        per, overall = pad_shares(stats)
        real_per_batch = statistics.fmean(s[1] for s in stats) / SR
        rows[name] = (per, overall)
        print(f"[padding] {name:>10}: {len(stats)} batches, {statistics.fmean(s[0] for s in stats):.2f} utterances "
              f"and {real_per_batch:.1f} s of audio per batch (max {max(s[0] for s in stats)} utterances, "
              f"{max(s[2] for s in stats) / SR:.0f} s padded); padding {100 * per:.1f}% per batch, "
              f"{100 * overall:.1f}% overall")
    b_per, f_per = rows["bucketed"][0], rows[f"fixed {mb}"][0]
    print(f"[padding] ratio fixed/bucketed padding share: {f_per / b_per:.1f}x; bucketed under "
          f"{100 * PAD_TARGET:.0f}%: {'yes' if b_per < PAD_TARGET else 'NO'}")
    # the same clip lengths in file order, planned with other windows (plan_window only, no loader)
    for window in (16, 64, K, args.clips):
        plan_stats = []
        for a in range(0, len(lengths), window):
            w = lengths[a : a + window]
            plan_stats += [(len(b), sum(w[i] for i in b), len(b) * max(w[i] for i in b)) for b in plan_window(w, budget)]
        print(f"[padding] plan only, window {window:>4}: padding {100 * pad_shares(plan_stats)[0]:.1f}% per batch")

    # ----------------------------------------------------------------- training speed, side by side
    from scaling.models import build_model

    n = args.steps + 1  # +1 warm-up step each
    streams = {"bucketed": first_batches(recipe, n, micro_batch_size=0, max_batch_audio_samples=budget),
               f"fixed {mb}": first_batches(recipe, n, micro_batch_size=mb)}
    torch.manual_seed(0)
    student = build_model(recipe.model)
    models = {name: Model(recipe, copy.deepcopy(student)) for name in streams}
    for name, model in models.items():
        model.step(streams[name][0])
    spent = {name: 0.0 for name in streams}
    per_block = args.steps // args.blocks
    for blk in range(args.blocks):
        names = list(streams) if blk % 2 == 0 else list(streams)[::-1]
        for name in names:
            batches = streams[name][1 + blk * per_block : 1 + (blk + 1) * per_block]
            t0 = time.perf_counter()
            for b in batches:
                models[name].step(b)
            spent[name] += time.perf_counter() - t0
    timed = args.blocks * per_block
    speed = {}
    for name, batches in streams.items():
        stats = [batch_stats(b) for b in batches[1 : 1 + timed]]
        utts, real, padded = (sum(s[i] for s in stats) for i in range(3))
        speed[name] = (utts / spent[name], real / SR / spent[name], padded / SR / spent[name])
        print(f"[train] {name:>10}: {timed} steps in {spent[name]:.1f} s, {utts} utterances: {speed[name][0]:.1f} "
              f"utterances/s, {speed[name][1]:.1f} s of audio/s ({speed[name][2]:.1f} s padded/s)")
    b, f = speed["bucketed"], speed[f"fixed {mb}"]
    print(f"[train] ratio bucketed/fixed: {b[0] / f[0]:.2f}x utterances/s, {b[1] / f[1]:.2f}x audio s/s "
          f"({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
