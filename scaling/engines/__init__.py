"""Engines: one module per parallelism backend behind :class:`scaling.engines.base.Engine`."""

from scaling.config import EngineConfig, TrainConfig
from scaling.engines.base import Engine


def build_engine(engine_cfg: EngineConfig, train_cfg: TrainConfig) -> Engine:
    """Import only the chosen backend (DeepSpeed's import alone costs seconds)."""
    if engine_cfg.name == "single":
        from scaling.engines.single import SingleEngine as cls
    elif engine_cfg.name == "ddp":
        from scaling.engines.ddp import DDPEngine as cls
    elif engine_cfg.name == "fsdp":
        from scaling.engines.fsdp import FSDPEngine as cls
    elif engine_cfg.name == "deepspeed":
        from scaling.engines.deepspeed import DeepSpeedEngine as cls
    else:  # the recipe's Literal type already rejects other names
        raise AssertionError(engine_cfg.name)
    return cls(engine_cfg, train_cfg)


__all__ = ["Engine", "build_engine"]
