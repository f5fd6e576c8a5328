"""Backbones, embedding heads and the Mixed Difference Network. Models never know about DDP or Ray."""

from pipeline.models.embedding import EmbeddingNet
from pipeline.models.factory import build_model, initial_state
from pipeline.models.mixed_diff import MixedDifferenceNet, model_branch_loss

__all__ = ["EmbeddingNet", "MixedDifferenceNet", "build_model", "initial_state", "model_branch_loss"]
