"""``scaling-probe CHECKPOINT --train SHARDS --test SHARDS``: does pretraining learn?

Freezes the student encoder of a checkpoint, extracts one mean-pooled feature vector per labelled
sample of ``--train`` and ``--test`` (webdataset shards of any modality, as ``data.train_shards``:
a brace pattern or a comma-separated list; samples need a ``cls`` label), fits a multinomial
logistic regression on the train features, and reports its test accuracy and the test accuracy of
a cosine k-NN classifier, next to the chance level. ``--random-init`` scores a randomly initialised
encoder of the same shape (the baseline that pretraining must beat). Accuracies are printed and
logged to MLflow (``probe/linear_acc``, ``probe/knn_acc``; ``probe_random/...`` with
``--random-init``) at the checkpoint's step: into the training run of the checkpoint when it has
one (the run id in its train state; the store from the run's ``run.json``, else ``--tracking-uri``),
so the probe's curve sits beside the loss; the probe's settings are that run's artifact
``probe/step_XXXXXXXX.json`` (params cannot be added twice). A checkpoint without a run (tracking
off, weights only) gets a run of its own in ``--experiment``, as before.

CHECKPOINT is a checkpoint directory (``checkpoint.dir/step_XXXXXXXX``) or a run's
``checkpoint.dir``, whose newest intact checkpoint is taken. Any engine's checkpoint (single, ddp,
fsdp, DeepSpeed ZeRO-1/2/3) is read in one process without a process group, through
:mod:`scaling.checkpoint` (which refuses files that would run code). The model shape and the data
processing come from the checkpoint's recipe.

Features. The student's frontend makes the unmasked encoder input (``FrontendOutput.teacher_x``:
what the teacher sees, computed with the student's weights), the student encoder runs in eval
mode (no dropout, drop path or LayerDrop), and the chosen layer is averaged over the non-padded
positions (vision: over the patches; CLS is not part of the encoder output). ``--layer -1``
(default) is the encoder's final output; ``--layer k`` is block k's tap, Python-indexed over the
``model.depth`` blocks (``0`` the first block, ``-2`` the second to last; ``-1`` stays the final
output). ``--tap block`` (default) taps block outputs, so ``--layer depth-1`` equals ``-1``;
``--tap ffn`` taps the FFN output before the last residual (data2vec's training target).

Data. Shards are read through :func:`scaling.data.build_loader` with the checkpoint's recipe,
vision augmentation off (a plain resize when the size differs), no shuffle buffer, one rank and
one finite pass (``epochs=1``: every sample once, with any ``data.num_workers``). A text document
longer than a block is read as several blocks; its feature is the mean over all of its tokens
(every block's), so each labelled document is one sample, as each clip or image is. Unlabelled
samples (label -1) are skipped.

Classifiers (torch only). Features are standardised with the train mean and std. Linear:
multinomial logistic regression, zero-initialised weights, L2 penalty ``l2 * |W|^2``, full-batch
L-BFGS with a strong-Wolfe line search (deterministic). k-NN: cosine similarity of the
standardised features, the ``k`` nearest train samples vote, ties go to the class with the larger
summed similarity. Chance: ``1 / number of train classes``; the majority-class rate (test share of
the most frequent train class) is printed and returned too.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from scaling.checkpoint import read_meta, read_recipe, read_state_dict, resolve
from scaling.config import Recipe
from scaling.models import Data2Vec, build_model

__all__ = [
    "load_student",
    "random_student",
    "extract_features",
    "linear_probe",
    "knn_accuracy",
    "probe",
    "checkpoint_run",
    "main",
]

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "scaling-probe"


# ============================================================================= checkpoints
def _build(recipe: Recipe, seed: int) -> Data2Vec:
    # A private RNG stream: building the model must not move the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(recipe.model)


def load_student(checkpoint: str | Path) -> tuple[Data2Vec, Recipe]:
    """The student (fp32, CPU, eval mode) and the recipe of a checkpoint, from any engine's format.

    ``checkpoint``: a checkpoint directory or a ``checkpoint.dir`` (its newest intact checkpoint).
    Raises ValueError naming the path when nothing intact is found, a file is refused, or the
    stored tensors do not fit the recipe's model."""
    ckpt = resolve(checkpoint)
    recipe = read_recipe(ckpt)
    model = _build(recipe, recipe.seed)
    try:
        model.load_state_dict(read_state_dict(ckpt, "student"), strict=True)
    except RuntimeError as exn:
        raise ValueError(f"{ckpt}: the stored student does not match the recipe's model: {exn}") from exn
    model.float().eval().requires_grad_(False)
    return model, recipe


def random_student(recipe: Recipe, seed: Optional[int] = None) -> Data2Vec:
    """A randomly initialised student of the recipe's shape. The default seed, ``recipe.seed``,
    gives exactly the weights that run started from (pretraining seeds with it before building)."""
    model = _build(recipe, recipe.seed if seed is None else seed)
    return model.float().eval().requires_grad_(False)


# ============================================================================= features
def _block_index(layer: int, depth: int) -> Optional[int]:
    """None for the final output (-1), else the 0-based block whose tap is used."""
    if layer == -1:
        return None
    if 0 <= layer < depth:
        return layer
    if -depth <= layer < -1:
        return depth + layer
    raise ValueError(f"layer {layer} is out of range for a {depth}-block encoder: use -1 (final output), "
                     f"0..{depth - 1} or -{depth}..-2 (a block's tap)")


def _probe_recipe(recipe: Recipe, shards: str) -> Recipe:
    r = copy.deepcopy(recipe)
    r.data.train_shards = shards
    r.data.shuffle_buffer = 0
    r.data.vision.augment = False
    r.masking.clones = 1  # features of the unmasked input: the masks are not used, one view per row suffices
    return r


@torch.no_grad()
def _pooled_sums(model: Data2Vec, batch: dict[str, torch.Tensor], block: Optional[int],
                 tap: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the chosen layer summed over the non-padded positions ``[B, D]``, and their count ``[B]``."""
    fo = model.frontend(batch)
    depth = len(model.encoder.blocks) - getattr(model.encoder, "prenet_depth", 0)  # layers count main blocks
    num_taps = 0 if block is None else depth - block
    eo = model.encoder(fo.teacher_x, padding_mask_BT=fo.padding_mask_BT, mask_BT=None, num_taps=num_taps, tap=tap)
    h = eo.x_BTD if block is None else eo.taps[0]
    h = h.float()
    if fo.padding_mask_BT is None:
        return h.sum(1), h.new_full(h.shape[:1], h.shape[1])
    keep = (~fo.padding_mask_BT).to(h.dtype)
    return (h * keep[..., None]).sum(1), keep.sum(1)


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def extract_features(model: Data2Vec, recipe: Recipe, shards: str, *, layer: int = -1, tap: str = "block",
                     batch_size: int = 64, device: str | torch.device | None = "auto",
                     max_samples: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled features ``[N, D]`` (float32, CPU) and labels ``[N]`` (int64) of the labelled
    samples in one epoch of ``shards`` (or the first ``max_samples`` of them)."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    from scaling.data import build_loader
    from scaling.modalities import spec_for

    block = _block_index(layer, recipe.model.depth)
    r = _probe_recipe(recipe, shards)
    dev = _pick_device(device)
    model = model.to(dev).eval()
    # One finite pass (epochs=1): every sample once, whatever data.num_workers says.
    loader = build_loader(r.data, r.model, r.masking, seed=r.seed, rank=0, world_size=1,
                          micro_batch_size=batch_size, epochs=1)
    # Text blocks of one document share its id in sample_id >> 16 (scaling.modalities.text); the
    # label is part of the key so that an id collision never mixes classes.
    shift = spec_for(r.model.modality).sample_id_shift
    documents: dict[tuple[int, int], int] = {}  # (source sample, label) -> row of the result
    rows, sums, counts = [], [], []
    try:
        for batch in loader:
            label = batch.get("label_B")
            if label is None:
                continue
            keep = label >= 0  # unlabelled samples (no 'cls' member) in a partly labelled set
            doc_rows = []
            for i, (sid, y) in enumerate(zip((batch["sample_id_B"] >> shift).tolist(), label.tolist())):
                if keep[i] and (sid, y) not in documents:
                    if max_samples is not None and len(documents) == max_samples:
                        keep[i] = False
                        continue
                    documents[(sid, y)] = len(documents)
                if keep[i]:
                    doc_rows.append(documents[(sid, y)])
            if not keep.any() and max_samples is not None and len(documents) >= max_samples:
                break  # the cap is reached (a document's later blocks may be dropped: --max-samples is for quick looks)
            if keep.any():
                total, count = _pooled_sums(model, {k: v[keep].to(dev) for k, v in batch.items()}, block, tap)
                rows.append(torch.tensor(doc_rows, dtype=torch.int64))
                sums.append(total.cpu())
                counts.append(count.cpu())
    finally:
        loader.close()
    if not documents:
        raise ValueError(f"{shards}: no labelled samples (a sample's label is its 'cls' member)")
    row = torch.cat(rows)
    total = torch.zeros(len(documents), sums[0].shape[1]).index_add_(0, row, torch.cat(sums))
    count = torch.zeros(len(documents)).index_add_(0, row, torch.cat(counts))
    labels = torch.tensor([y for _, y in documents], dtype=torch.int64)
    return total / count.clamp_min(1.0)[:, None], labels


# ============================================================================= classifiers
def _standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    train_x = train_x.float()
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False).clamp_min(1e-6)
    return [(x.float() - mean) / std for x in (train_x, *others)]


def _class_index(train_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.unique(train_y)
    if classes.numel() < 2:
        raise ValueError(f"the train set has {classes.numel()} class(es); a probe needs at least 2")
    return classes, torch.searchsorted(classes, train_y)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 l2: float = 1e-4, max_iter: int = 300) -> dict[str, float]:
    """Multinomial logistic regression on standardised features (L-BFGS, zero init, L2 ``l2 * |W|^2``).
    Returns ``{"acc": test accuracy, "train_acc": train accuracy}``. Test labels never seen in
    train count as errors."""
    classes, ytr = _class_index(train_y)
    xtr, xte = _standardise(train_x, test_x)
    dev = xtr.device
    W = torch.zeros(xtr.shape[1], classes.numel(), device=dev, requires_grad=True)
    b = torch.zeros(classes.numel(), device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ W + b, ytr) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = ((xtr @ W + b).argmax(1) == ytr).float().mean().item()
        pred = classes[(xte @ W + b).argmax(1)]
        acc = (pred == test_y.to(pred.device)).float().mean().item()
    return {"acc": acc, "train_acc": train_acc}


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 k: int = 20, chunk: int = 1024) -> float:
    """Test accuracy of a cosine k-NN majority vote on standardised features (ties: larger summed
    similarity). ``k`` is capped at the train size."""
    if k <= 0:
        raise ValueError("k must be positive")
    classes, ytr = _class_index(train_y)
    xtr, xte = _standardise(train_x, test_x)
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    k = min(k, xtr.shape[0])
    C = classes.numel()
    correct = 0
    for s in range(0, xte.shape[0], chunk):
        q = xte[s : s + chunk]
        sims, idx = (q @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], C, device=q.device)
        votes.scatter_add_(1, ytr[idx], torch.ones_like(sims))
        tie = torch.zeros_like(votes).scatter_add_(1, ytr[idx], sims)
        pred = classes[(votes + 1e-3 * tie / k).argmax(1)]  # |tie / k| <= 1: only breaks ties
        correct += int((pred == test_y[s : s + chunk].to(pred.device)).sum())
    return correct / max(1, xte.shape[0])


def chance_levels(train_y: torch.Tensor, test_y: torch.Tensor) -> tuple[float, float]:
    """(1 / number of train classes, test share of the most frequent train class)."""
    classes, counts = torch.unique(train_y, return_counts=True)
    majority = classes[counts.argmax()]
    return 1.0 / classes.numel(), (test_y == majority).float().mean().item()


# ============================================================================= the probe
def _log_mlflow(uri: str, experiment: str, run_name: str, params: dict, metrics: dict, step: int) -> str:
    from scaling.tracking import artifact_root, set_tracking_uri  # first: it turns MLflow's telemetry off

    import mlflow

    set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_root(uri))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics(metrics, step=step)
        return run.info.run_id


def checkpoint_run(ckpt: Path) -> tuple[str | None, str | None]:
    """(MLflow run id, tracking URI) of the run that wrote ``ckpt``: the id from its rank-0 train
    state, the URI from ``run.json`` beside it when that names the same run; (None, None) without one."""
    from scaling.checkpoint.layout import train_state_file
    from scaling.checkpoint.safe import CheckpointError, load_torch
    from scaling.tracking import read_run_json

    try:
        run_id = load_torch(train_state_file(ckpt, 0)).get("mlflow_run_id")
    except CheckpointError:  # a weights-only checkpoint has no train state
        return None, None
    if not run_id:
        return None, None
    info = read_run_json(ckpt.parent) or {}
    mlflow_info = info.get("mlflow") or {}
    return run_id, mlflow_info.get("tracking_uri") if mlflow_info.get("run_id") == run_id else None


def _log_into_run(uris: list[str], run_id: str, params: dict, metrics: dict, step: int, prefix: str) -> str | None:
    """Log into the existing run ``run_id`` in the first of ``uris`` that holds it; its URI, or None."""
    import scaling.tracking  # noqa: F401  (first: importing it turns MLflow's telemetry off)

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for uri in uris:
        client = MlflowClient(tracking_uri=uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            continue
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        client.log_dict(run_id, {k: v for k, v in params.items()}, f"{prefix}/step_{step:08d}.json")
        return uri
    return None


def probe(checkpoint: str | Path, train_shards: str, test_shards: str, *, random_init: bool = False,
          layer: int = -1, tap: str = "block", k: int = 20, l2: float = 1e-4, batch_size: int = 64,
          max_samples: Optional[int] = None, device: str | torch.device | None = "auto",
          seed: Optional[int] = None, tracking_uri: Optional[str] = None,
          experiment: str = DEFAULT_EXPERIMENT, run_name: Optional[str] = None, verbose: bool = True) -> dict:
    """Probe a checkpoint (or, with ``random_init``, a random encoder of its recipe's shape).

    ``checkpoint``: a checkpoint directory or a ``checkpoint.dir``. ``max_samples`` caps each split.
    ``seed`` (random init only): default ``recipe.seed``. ``tracking_uri``: log to MLflow there
    (None: no tracking). Returns ``linear_acc``, ``knn_acc``, ``linear_train_acc``, ``chance``,
    ``majority``, counts, ``prefix`` (``probe`` or ``probe_random``), ``checkpoint``, ``step`` and
    ``mlflow_run_id``."""
    t0 = time.perf_counter()
    ckpt = resolve(checkpoint)
    step = int(read_meta(ckpt)["step"])
    if random_init:
        recipe = read_recipe(ckpt)
        model = random_student(recipe, seed)
    else:
        model, recipe = load_student(ckpt)
    prefix = "probe_random" if random_init else "probe"
    kw = dict(layer=layer, tap=tap, batch_size=batch_size, device=device, max_samples=max_samples)
    train_x, train_y = extract_features(model, recipe, train_shards, **kw)
    test_x, test_y = extract_features(model, recipe, test_shards, **kw)
    lin = linear_probe(train_x, train_y, test_x, test_y, l2=l2)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=k)
    chance, majority = chance_levels(train_y, test_y)
    num_classes = int(torch.unique(train_y).numel())
    result = {
        "linear_acc": lin["acc"], "knn_acc": knn, "linear_train_acc": lin["train_acc"], "chance": chance,
        "majority": majority, "num_classes": num_classes, "num_train": int(train_y.numel()),
        "num_test": int(test_y.numel()), "feature_dim": int(train_x.shape[1]), "layer": layer, "tap": tap, "k": k,
        "random_init": random_init, "prefix": prefix, "checkpoint": str(ckpt), "step": step,
        "modality": recipe.model.modality, "mlflow_run_id": None,
    }
    if verbose:
        what = f"random init of {ckpt.name}'s recipe" if random_init else ckpt.name
        print(f"[probe] {what} ({recipe.model.modality}, step {step}, layer {layer}, tap {tap}): "
              f"{result['num_train']} train / {result['num_test']} test samples, {num_classes} classes, "
              f"{result['feature_dim']}-d features", flush=True)
        print(f"[probe] {prefix}/linear_acc {lin['acc']:.4f} (train {lin['train_acc']:.4f})", flush=True)
        print(f"[probe] {prefix}/knn_acc {knn:.4f} (k={min(k, result['num_train'])})", flush=True)
        print(f"[probe] chance {chance:.4f} (1/{num_classes} classes); majority class {majority:.4f}", flush=True)
    if tracking_uri:
        params = {"checkpoint": str(ckpt), "step": step, "modality": recipe.model.modality,
                  "random_init": random_init, "layer": layer, "tap": tap, "k": k, "l2": l2,
                  "train_shards": train_shards, "test_shards": test_shards, "num_train": result["num_train"],
                  "num_test": result["num_test"], "num_classes": num_classes,
                  "feature_dim": result["feature_dim"], "max_samples": max_samples,
                  "seed": (recipe.seed if seed is None else seed) if random_init else recipe.seed}
        metrics = {f"{prefix}/linear_acc": lin["acc"], f"{prefix}/knn_acc": knn,
                   f"{prefix}/linear_train_acc": lin["train_acc"], f"{prefix}/chance": chance,
                   f"{prefix}/majority": majority}
        run_id, run_uri = checkpoint_run(ckpt)
        logged_in = None
        if run_id is not None:  # the training run's own store first: it is known to hold the run
            logged_in = _log_into_run([u for u in (run_uri, tracking_uri) if u], run_id, params, metrics, step, prefix)
        if logged_in is not None:
            result["mlflow_run_id"] = run_id
            if verbose:
                print(f"[probe] logged into the training run {run_id} in {logged_in}", flush=True)
        else:
            name = run_name or f"{'random-init' if random_init else 'probe'} {ckpt.parent.name}/{ckpt.name}"
            result["mlflow_run_id"] = _log_mlflow(tracking_uri, experiment, name, params, metrics, step)
            if verbose:
                print(f"[probe] MLflow run {result['mlflow_run_id']} in {tracking_uri} (experiment '{experiment}')",
                      flush=True)
    result["seconds"] = time.perf_counter() - t0
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scaling-probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory, or a checkpoint.dir (its newest complete checkpoint)")
    p.add_argument("--train", required=True, metavar="SHARDS", help="labelled train shards (as data.train_shards)")
    p.add_argument("--test", required=True, metavar="SHARDS", help="labelled test shards (as data.train_shards)")
    p.add_argument("--random-init", action="store_true",
                   help="score a randomly initialised encoder of the same recipe (the baseline)")
    p.add_argument("--layer", type=int, default=-1,
                   help="-1: the encoder's final output (default); k: block k's tap (0-based, or -depth..-2)")
    p.add_argument("--tap", choices=["block", "ffn"], default="block", help="what a block's tap is (default block)")
    p.add_argument("-k", "--k", type=int, default=20, help="neighbours of the k-NN vote (default 20)")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty of the linear classifier (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=None, help="cap on the labelled samples of each split")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None, help="--random-init's seed (default: the recipe's seed)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                   help=f"MLflow store (default {DEFAULT_TRACKING_URI})")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--run-name", default=None)
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        probe(args.checkpoint, args.train, args.test, random_init=args.random_init, layer=args.layer, tap=args.tap,
              k=args.k, l2=args.l2, batch_size=args.batch_size, max_samples=args.max_samples, device=args.device,
              seed=args.seed, tracking_uri=None if args.no_tracking else args.tracking_uri,
              experiment=args.experiment, run_name=args.run_name)
    except ValueError as exn:
        print(f"scaling-probe: error: {exn}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
