"""``scaling-convert``: take weights out of a run and back in.

    scaling-convert consolidate CKPT OUT.safetensors [--part student|teacher|both] [--dtype fp32|bf16|fp16]
    scaling-convert to-hf CKPT OUT_DIR [--part student|teacher] [--tokenizer SPM_MODEL]
    scaling-convert from-hf HF_DIR OUT_CKPT [--recipe RECIPE] [--set key.path=value ...]

CKPT is a checkpoint directory or a run's ``checkpoint.dir`` (its newest intact checkpoint), of any
engine (single, ddp, fsdp, DeepSpeed ZeRO-1/2/3); it is read in this one process, with no process
group, and no file of it may run code.

consolidate: one safetensors file, written one tensor at a time (peak memory about the largest
  tensor, not the model). ``student`` keys are ``Data2Vec.state_dict()``'s, ``teacher`` keys
  ``encoder.*``, ``both`` prefixes them ``student.`` / ``teacher.``.
to-hf: ``config.json`` + ``model.safetensors`` that ``transformers.AutoModel.from_pretrained(OUT_DIR)``
  loads into Data2VecAudioModel / Data2VecVisionModel / Data2VecTextModel, plus the feature
  extractor, image processor or tokenizer. The default is the student: it is what data2vec's
  authors fine-tune and release (fairseq's and HF's converted checkpoints are the student, the
  ``_ema`` teacher is dropped), and what ``scaling-probe`` measures. ``--part teacher`` exports the EMA
  teacher's encoder with the student's shared parts (the speech/text front-end; for vision, the
  student's final LayerNorm, which the teacher does not have). What HF cannot represent is refused
  with the reason.
from-hf: a weights-only checkpoint (student = the HF encoder and front-end, a freshly initialised
  regression head; teacher = a copy of the student's encoder) with a recipe whose model section
  comes from the HF config and whose other sections from ``--recipe`` (default: the repository's
  ``recipes/<modality>/base.yaml``). Continue pretraining from it, or from the HF directory itself,
  with ``--set model.init_from=PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from scaling.checkpoint import (
    CheckpointError,
    model_changes,
    model_shape,
    open_parts,
    read_recipe,
    save_weights,
)
from scaling.checkpoint.consolidate import DTYPES, consolidate
from scaling.config import Recipe, load_recipe, merge, recipe_from_dict

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# ============================================================================= to-hf
def to_hf(checkpoint: str | Path, out_dir: str | Path, *, part: str = "student",
          tokenizer: Optional[str] = None) -> Path:
    """Export a checkpoint's student (or EMA teacher) to an HF transformers directory."""
    from scaling.hf import export_pretrained

    if part not in ("student", "teacher"):
        raise ValueError(f"--part must be student or teacher for to-hf, got {part!r}")
    ckpt, _, sources = open_parts(checkpoint, ["student", part] if part == "teacher" else ["student"])
    state = {}
    for source in sources.values():  # the teacher's encoder replaces the student's; shared parts stay
        state.update(source.read(list(source.infos)))
    return export_pretrained(read_recipe(ckpt), state, out_dir, tokenizer=tokenizer)


# ============================================================================= from-hf and model.init_from
def _check_shape(source: str, theirs: dict, recipe: Recipe) -> None:
    """The weights' architecture must be the recipe's, for every field the source carries (dropouts may differ)."""
    ours = model_shape(recipe.model)
    if "speech" in theirs:  # HF stores the pos-conv kernel, not the width it is derived from
        from scaling.models.speech import pos_conv_kernel

        kernel = [pos_conv_kernel(s["conv_pos_width"], s["conv_pos_depth"]) for s in (theirs["speech"], ours["speech"])]
        if kernel[0] == kernel[1]:
            theirs = {**theirs, "speech": {**theirs["speech"], "conv_pos_width": ours["speech"]["conv_pos_width"]}}
    architecture, _ = model_changes(theirs, ours, shared_only=True)
    if architecture:
        raise ValueError(f"model.init_from={source}: its model differs from the recipe's (weights -> recipe): "
                         f"{'; '.join(architecture)}")


def initial_weights(recipe: Recipe) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``model.init_from``'s tensors: (student tensors, in ``Data2Vec.state_dict()`` names; the EMA
    teacher's ``encoder.*`` tensors, or None to start the teacher as a copy of the student). An HF
    directory (``config.json``) gives its front-end and encoder; a scaling checkpoint (or
    ``checkpoint.dir``) gives its whole student and its teacher."""
    source = recipe.model.init_from
    path = Path(source)
    if (path / "config.json").is_file():
        from scaling.hf import import_pretrained

        section, tensors, _ = import_pretrained(path)
        _check_shape(source, section, recipe)
        return tensors, None
    _, meta, sources = open_parts(path)
    _check_shape(source, meta["model"], recipe)
    return tuple(s.read(list(s.infos)) for s in (sources["student"], sources["teacher"]))


def load_initial_weights(student: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``initial_weights``' student tensors into ``student``; what the source lacks (an HF model
    has no regression head) keeps its initialisation."""
    missing, unexpected = student.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected  # the adapters and readers give only our names
    if any(not k.startswith("head.") for k in missing):
        raise ValueError(f"model.init_from: the weights lack {sorted(missing)[:4]}")


def from_hf(hf_dir: str | Path, out_ckpt: str | Path, *, recipe: Optional[str | Path] = None,
            overrides: tuple[str, ...] = ()) -> Path:
    """Write a weights-only scaling checkpoint from an HF Data2Vec directory (see the module docstring)."""
    from scaling.hf import import_pretrained
    from scaling.models import build_model
    from scaling.teacher import EMATeacher

    section, tensors, data_hints = import_pretrained(hf_dir)
    if recipe is None:
        recipe = REPO_RECIPES / section["modality"] / "base.yaml"
        if not recipe.is_file():
            raise ValueError(f"no --recipe given and {recipe} does not exist: pass the recipe whose objective, "
                             "masking and optimisation settings the continued pretraining should use")
    base = load_recipe(recipe, overrides, require_data=False)  # the run that continues from it names its data
    tree = dataclasses.asdict(base)
    tree["model"] = merge(tree["model"], section)
    tree["data"] = merge(tree["data"], data_hints)
    tree["model"]["init_from"] = ""
    r = recipe_from_dict(tree, f"{recipe} with the model of {hf_dir}", require_data=False)
    torch.manual_seed(r.seed)  # the regression head starts as a run of this recipe would start it
    student = build_model(r.model)
    load_initial_weights(student, tensors)
    teacher = EMATeacher(student.encoder)
    return save_weights(out_ckpt, r, student.state_dict(), teacher.state_dict(), source=str(hf_dir))


# ============================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scaling-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="one streamed safetensors file of the student and/or teacher")
    c.add_argument("checkpoint", help="a checkpoint directory, or a checkpoint.dir (its newest intact checkpoint)")
    c.add_argument("out", help="the .safetensors file to write")
    c.add_argument("--part", choices=["student", "teacher", "both"], default="student")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="convert floating tensors (default: fp32)")
    h = sub.add_parser("to-hf", help="an HF transformers model directory (config, weights, processor)")
    h.add_argument("checkpoint", help="a checkpoint directory, or a checkpoint.dir")
    h.add_argument("out_dir")
    h.add_argument("--part", choices=["student", "teacher"], default="student",
                   help="student (default: what data2vec fine-tunes and releases) or the EMA teacher")
    h.add_argument("--tokenizer", default=None,
                   help="text: the sentencepiece model (default: the recipe's data.text.tokenizer)")
    f = sub.add_parser("from-hf", help="a weights-only checkpoint from an HF Data2Vec directory")
    f.add_argument("hf_dir")
    f.add_argument("out_ckpt")
    f.add_argument("--recipe", default=None, help="recipe for everything but the model (default: "
                                                  "recipes/<modality>/base.yaml of this repository)")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "consolidate":
            info = consolidate(args.checkpoint, args.out, part=args.part,
                               dtype=DTYPES[args.dtype] if args.dtype else None)
            print(f"[convert] {info['checkpoint']} (step {info['step']}) -> {info['path']}: {args.part}, "
                  f"{info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB", flush=True)
        elif args.command == "to-hf":
            out = to_hf(args.checkpoint, args.out_dir, part=args.part, tokenizer=args.tokenizer)
            print(f"[convert] {args.checkpoint} ({args.part}) -> {out}: load it with "
                  f"transformers.AutoModel.from_pretrained('{out}')", flush=True)
        else:
            out = from_hf(args.hf_dir, args.out_ckpt, recipe=args.recipe, overrides=tuple(args.overrides))
            print(f"[convert] {args.hf_dir} -> {out}: continue pretraining with --set model.init_from={out}",
                  flush=True)
    except (ValueError, CheckpointError) as exn:
        print(f"scaling-convert: error: {exn}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
