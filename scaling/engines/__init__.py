"""Engines: one module per parallelism backend behind :class:`scaling.engines.base.Engine`."""

from scaling.config import EngineConfig, TrainConfig
from scaling.engines.base import Engine


def engine_class(name: str) -> type[Engine]:
    """The engine class for ``engine.name``; importing a backend's module does not import its library
    (DeepSpeed's import alone costs seconds), building the engine does."""
    if name == "single":
        from scaling.engines.single import SingleEngine as cls
    elif name == "ddp":
        from scaling.engines.ddp import DDPEngine as cls
    elif name == "fsdp":
        from scaling.engines.fsdp import FSDPEngine as cls
    elif name == "deepspeed":
        from scaling.engines.deepspeed import DeepSpeedEngine as cls
    else:  # the recipe's Literal type already rejects other names
        raise AssertionError(name)
    return cls


def build_engine(engine_cfg: EngineConfig, train_cfg: TrainConfig) -> Engine:
    return engine_class(engine_cfg.name)(engine_cfg, train_cfg)


__all__ = ["Engine", "build_engine", "engine_class"]
