"""Masked views per second: data2vec 2.0 against data2vec v1 on the same ViT, input and machine, in one run.

A masked view is one (sample, mask) pair the student learns from: v1 makes one per image, 2.0 makes M
(``masking.clones``) per image from one teacher pass and one patch embedding, and its student encoder
runs on the kept patches only. Both sides are our training step (``Trainer.train_step`` on the single
engine, built by ``benchmarks/step_vs_hf.py``'s ``our_step_fn``) on prefetched batches of their own recipe
(``recipes/vision/base.yaml`` for v1, ``recipes/vision/v2-base.yaml`` for 2.0: masking, objective, optimiser),
with the ViT overridden to one shared size. Timed repeats alternate v1 and 2.0; reported: ms per step
(median of repeats), masked views per second and the ratio 2.0 / v1 (goal >= 4), images per second.

Then a split of the 2.0 step (separate repeats with a synchronize around each region): teacher forward,
student encoder forward, decoder forward, student backward (decoder and encoder parts, split by hooks on
the decoder), optimizer, EMA, and the rest of the step.

    python benchmarks/v2_views.py                      # ViT dim 384, 6 blocks, 224 px, CPU, fp32
    python benchmarks/v2_views.py --size base          # ViT-B/16 (slow on a CPU: use --steps 1)
    python benchmarks/v2_views.py --device cuda --precision bf16 --size base --v1-batch 64 --v2-batch 16
    python benchmarks/v2_views.py --quick              # a smoke run (112 px, dim 128, 2 blocks)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.hf_step import RegionTimer, sync_fn  # noqa: E402
from benchmarks.step_vs_hf import our_step_fn, prefetch  # noqa: E402
from scaling.config import load_recipe  # noqa: E402
from scaling.plan import resolve  # noqa: E402

SIZES = {  # dim, depth, heads, image size, v2 decoder (dim, kernel, layers)
    "quick": (128, 2, 4, 112, (128, 3, 2)),
    "small": (384, 6, 6, 224, (384, 3, 6)),
    "base": (768, 12, 12, 224, (768, 3, 6)),
}


def make_recipe(version: int, args):
    dim, depth, heads, image, (ddim, dkernel, dlayers) = SIZES[args.size]
    batch = args.v1_batch if version == 1 else args.v2_batch
    common = ["engine.name=single", f"train.device={args.device}", f"train.precision={args.precision}",
              "tracking.enabled=false", "data.train_shards=synthetic", "data.num_workers=0",
              f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}", "train.reference_batch=0",
              "train.max_steps=100000", f"model.dim={dim}", f"model.depth={depth}", f"model.heads={heads}",
              f"model.ffn_dim={4 * dim}", f"model.vision.image_size={image}",
              f"objective.top_k={min(depth, 6 if version == 1 else depth)}"]
    if version == 1:
        path, extra = "base.yaml", []
    else:  # the same number of blocks in all: no prenet
        path, extra = "v2-base.yaml", ["model.v2.prenet_depth=0", f"model.v2.decoder_dim={ddim}",
                                       f"model.v2.decoder_kernel={dkernel}", f"model.v2.decoder_layers={dlayers}",
                                       f"masking.clones={args.clones}"]
    recipe = load_recipe(REPO / "recipes/vision" / path, common + extra)
    return resolve(recipe, 1, read_data=False).resolved()


def split_v2(ours, batches, device) -> dict[str, float]:
    """Seconds per region of one pass over ``batches`` (a synchronize around each region)."""
    timer = RegionTimer(device)
    hooks = []
    marks: dict[str, float] = {}
    with ours.instrument(timer):
        engine_model = ours.engine.model
        encoder, decoder = engine_model.encoder, engine_model.decoder
        enc_fwd, dec_fwd = encoder.forward, decoder.forward
        encoder.forward = _timed(timer, "student encoder fwd", enc_fwd)
        decoder.forward = _timed(timer, "decoder fwd", dec_fwd)
        hooks.append(decoder.register_full_backward_pre_hook(lambda m, g: marks.__setitem__("dec0", time.perf_counter())))
        hooks.append(decoder.register_full_backward_hook(lambda m, gi, go: marks.__setitem__("dec1", time.perf_counter())))
        t0 = time.perf_counter()
        decoder_bwd = 0.0
        for b in batches:
            ours.step([b])
            if "dec0" in marks and "dec1" in marks:
                decoder_bwd += marks["dec1"] - marks["dec0"]
        total = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        encoder.__dict__.pop("forward", None)
        decoder.__dict__.pop("forward", None)
    seconds = dict(timer.seconds)
    # The student forward region wraps both the encoder and the decoder forwards; the backward region
    # holds the decoder's backward (between its hooks) and then the encoder's.
    seconds["student fwd (frontend, gather, loss parts)"] = (seconds.pop("student fwd", 0.0)
                                                             - seconds.get("student encoder fwd", 0.0)
                                                             - seconds.get("decoder fwd", 0.0))
    bwd = seconds.pop("student bwd", 0.0)
    seconds["decoder bwd"] = decoder_bwd
    seconds["student encoder bwd"] = bwd - decoder_bwd
    seconds["rest"] = total - sum(seconds.values())
    return {k: v / len(batches) for k, v in seconds.items()}


def _timed(timer, name, fn):
    def call(*args, **kwargs):
        with timer.region(name):
            return fn(*args, **kwargs)
    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--v1-batch", type=int, default=8, help="images per v1 step")
    p.add_argument("--v2-batch", type=int, default=2, help="images per 2.0 step (each gives --clones views)")
    p.add_argument("--clones", type=int, default=16, help="masked views per image in 2.0 (the recipes' M)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="--size quick --steps 1 --repeats 2")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.repeats = "quick", 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = {}
    for version in (1, 2):
        recipe = make_recipe(version, args)
        ours = our_step_fn(recipe)
        batches = prefetch(recipe, args.steps)
        views = sum(int(b["mask_BT"].shape[0]) for b in batches) / len(batches)
        images = sum(int(b["sample_id_B"].shape[0]) for b in batches) / len(batches)
        for b in batches[:1]:  # warm-up (allocator, first-call costs)
            ours.step([b])
        sides[version] = dict(recipe=recipe, ours=ours, batches=batches, views=views, images=images, ms=[])
    sync = sync_fn(sides[1]["ours"].device)
    for r in range(args.repeats):
        for version in ((1, 2) if r % 2 == 0 else (2, 1)):
            s = sides[version]
            sync()
            t0 = time.perf_counter()
            for b in s["batches"]:
                s["ours"].step([b])
            sync()
            s["ms"].append(1e3 * (time.perf_counter() - t0) / len(s["batches"]))
    dim, depth, heads, image, _ = SIZES[args.size]
    print(f"ViT dim {dim}, {depth} blocks, {heads} heads, {image} px, patch 16; device {args.device}, "
          f"{args.precision}, {torch.get_num_threads()} threads; {args.repeats} repeats of {args.steps} steps")
    rate = {}
    for version, s in sides.items():
        ms = statistics.median(s["ms"])
        rate[version] = s["views"] / (ms / 1e3)
        m = s["recipe"].masking
        kept = "all" if version == 1 else str(int(s["batches"][0]["keep_index_RK"].shape[1]))
        print(f"  v{version}: {s['images']:.0f} images x {s['views'] / s['images']:.0f} views per step, student "
              f"sees {kept} patches/view: {ms:8.1f} ms/step, {rate[version]:8.1f} masked views/s, "
              f"{s['images'] / (ms / 1e3):7.1f} images/s" + (f" (M={m.clones})" if version == 2 else ""))
    print(f"  ratio masked views/s, 2.0 / v1: {rate[2] / rate[1]:.2f}  (goal >= 4)")
    s = sides[2]
    split = split_v2(s["ours"], s["batches"], s["ours"].device)
    total = sum(split.values())
    print("  2.0 step split (ms per step, share):")
    for name, sec in split.items():
        print(f"    {name:42s} {1e3 * sec:8.1f}  {sec / total:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
