"""data2vec v1 models: ``build_model(cfg.model)`` returns the student ``Data2Vec`` with children
``frontend`` (shared with the teacher), ``encoder`` (EMA-updated; the teacher is a deepcopy of it)
and ``head``. See ``scaling/models/data2vec.py`` for the contract."""

from scaling.models.data2vec import (
    Data2Vec,
    EncoderOutput,
    FrontendOutput,
    RegressionHead,
    StudentOutput,
    build_model,
)

__all__ = ["build_model", "Data2Vec", "FrontendOutput", "EncoderOutput", "StudentOutput", "RegressionHead"]
