"""Backbones and embedding heads. Models never know about DDP or Ray."""

from pipeline.models.embedding import EmbeddingNet, build_model

__all__ = ["EmbeddingNet", "build_model"]
