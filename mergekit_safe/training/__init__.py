"""training: online EMA of the weights while fine-tuning (``ParameterEMA``, a ``transformers`` Trainer callback).
May import ``kernels`` and ``errors`` only."""

from mergekit_safe.training.ema import EMACallback, EMAConfig, ParameterEMA

__all__ = ["EMACallback", "EMAConfig", "ParameterEMA"]
