"""The network as its users call it: uint8 images in, unit-norm embeddings out.

:class:`InferenceModel` wraps a trained network (``EmbeddingNet`` or ``MixedDifferenceNet``)
with everything a caller would otherwise have to know: images are uint8 (N, H, W, 3) RGB
at any size (resized to the training side, as the evaluation's decode does), the
ImageNet normalisation is inside the network, and the output is L2-normalised float32
(N, d), so cosine similarity is a dot product. This is what a training run logs to MLflow
as its ``model`` (``pipeline.tracking.log_inference_model``); the training checkpoint
stays as it is, for resuming.
"""

from __future__ import annotations

import torch
from torch import nn


class InferenceModel(nn.Module):
    """uint8 (N, H, W, 3) images -> L2-normalised float32 (N, embedding_dim) embeddings.

    Always in eval mode (BatchNorm uses its running statistics): an image's embedding does
    not depend on the other images of its batch. Images whose side differs from
    ``image_size`` are resized (antialiased bilinear on uint8, as
    ``pipeline.data.decode.decode_into`` does at evaluation).
    """

    def __init__(self, net: nn.Module, image_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.net = net.eval()
        self.image_size = int(image_size)
        self.embedding_dim = int(embedding_dim)

    def train(self, mode: bool = True) -> InferenceModel:
        """Stays in eval mode whatever is asked (this module is never trained)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 (N, H, W, 3). Returns float32 (N, embedding_dim), rows of norm 1.

        Raises ValueError for another dtype or shape.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        size = self.image_size
        if images.shape[1] != size or images.shape[2] != size:
            from torchvision.transforms.v2.functional import resize

            images = resize(images.permute(0, 3, 1, 2), [size, size], antialias=True).permute(0, 2, 3, 1)
        with torch.inference_mode():
            return nn.functional.normalize(self.net(images.contiguous()).float(), dim=1)


def inference_model(model_cfg, state: dict, image_size: int) -> InferenceModel:
    """Build the network of ``model_cfg`` (a ``ModelConfig``), load ``state`` and wrap it.

    Raises what ``build_model`` and ``load_state_dict`` raise for a config that does not fit.
    """
    from pipeline.models.factory import build_model

    net = build_model(model_cfg)
    net.load_state_dict(state)
    return InferenceModel(net, image_size, model_cfg.embedding_dim)


def example_images(image_size: int, n: int = 2, seed: int = 0):
    """A small uint8 (n, image_size, image_size, 3) batch of noise: the logged model's input example."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
