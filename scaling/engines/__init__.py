"""Engines: one module per parallelism backend behind :class:`scaling.engines.base.Engine`."""

from scaling.config import EngineConfig, TrainConfig
from scaling.engines.base import Engine


def build_engine(engine_cfg: EngineConfig, train_cfg: TrainConfig) -> Engine:
    if engine_cfg.name == "single":
        from scaling.engines.single import SingleEngine

        return SingleEngine(train_cfg)
    raise ValueError(f"engine.name '{engine_cfg.name}' is not available yet (the sharded engines land with issue 3)")


__all__ = ["Engine", "build_engine"]
