"""Multi-task networks: AdaTT (arXiv 2304.04959) and the paper's baselines, pure PyTorch."""

from models.builder import build_model
from models.config import CategoricalInput, FeatureSchema, ModelConfig
from models.multitask import MultiTaskModel

__all__ = ["CategoricalInput", "FeatureSchema", "ModelConfig", "MultiTaskModel", "build_model"]
