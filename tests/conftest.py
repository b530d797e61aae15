import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # Run by default (CI runs everything); `-m "not slow"` leaves them out of a quick local pass.
    config.addinivalue_line("markers", "slow: a dry run of a large model at 1,024 ranks (tens of seconds)")


@pytest.fixture
def recipe_path():
    def path(modality: str, size: str = "tiny") -> str:
        return os.path.join(REPO, "recipes", modality, f"{size}.yaml")

    return path


# ----------------------------------------------------------------------------- checkpoints of every engine
@pytest.fixture(scope="session")
def engine_checkpoints(tmp_path_factory):
    """name -> (checkpoint.dir, gathered full state of the live engine) for dist_harness.ENGINES. Tiny
    runs, once per session: single (in this process), fsdp and ZeRO-3 (one 2-rank spawn), ZeRO-2 and
    ZeRO-1 (a spawn each: a second DeepSpeed engine in one process fails). Each rank 0 returns the
    engine's own gathered full_state_dict(), the reference the readers are compared with."""
    from dist_harness import ENGINES, engine_overrides, free_port, run_jobs, spawn
    from scaling.config import load_recipe
    from scaling.pretrain import run

    tmp = tmp_path_factory.mktemp("ckpt")
    recipe = load_recipe(os.path.join(REPO, "recipes", "vision", "tiny.yaml"), engine_overrides(tmp, "single"))
    states = {"single": run(recipe, gather_state=True).full_state}
    first = spawn(run_jobs, [(ENGINES[n][0], engine_overrides(tmp, n)) for n in ("fsdp", "zero3")], [free_port()])[0]
    states.update(fsdp=first[0]["state"], zero3=first[1]["state"])
    for name in ("zero2", "zero1"):
        states[name] = spawn(run_jobs, [(ENGINES[name][0], engine_overrides(tmp, name))], [])[0][0]["state"]
    return {name: (tmp / name, state) for name, state in states.items()}


