"""Training: the typed run config, the loop with its hooks, Ray Train sessions and the driver.

* :mod:`.config`: :class:`TrainConfig` and :func:`build_train_config` (settings -> resolved config).
"""
from .config import SETTINGS, TrainConfig, build_train_config, check_settings, is_tiny, read_categories

__all__ = ["TrainConfig", "build_train_config", "check_settings", "is_tiny", "read_categories", "SETTINGS"]
