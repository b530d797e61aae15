"""scaling: data2vec pretraining for speech, vision and text on one CPU or many sharded GPUs."""

__version__ = "0.1.0"
