"""Build the network a ``ModelConfig`` describes."""

from __future__ import annotations

from torch import nn

ARCHS = ("embedding", "mixed_diff")


def build_model(cfg) -> nn.Module:
    """Return the network of a ``ModelConfig``: ``arch`` embedding (:class:`EmbeddingNet`) or
    mixed_diff (:class:`MixedDifferenceNet`). Both map images to embeddings with ``model(images)``.

    Raises ValueError for an unknown arch, backbone, head or norm; FileNotFoundError for a missing
    weights file.
    """
    from pipeline.models.embedding import EmbeddingNet, build_backbone

    arch = getattr(cfg, "arch", "embedding")
    head = getattr(cfg, "head", "linear")
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch '{arch}' (choose {', '.join(ARCHS)})")
    norm = getattr(cfg, "norm", "batch")
    trunk, dim = build_backbone(cfg.backbone, cfg.weights, norm)
    if arch == "mixed_diff":
        from pipeline.models.mixed_diff import MixedDifferenceNet

        net = MixedDifferenceNet(trunk, dim, cfg.embedding_dim, cfg.num_vehicle_models,
                                 normalize=cfg.normalize, head=head)
    else:
        net = EmbeddingNet(trunk, dim, cfg.embedding_dim, cfg.normalize, head=head)
    if norm == "sync_batch":  # the heads' BatchNorm1d layers (linear_bn, the model branch) too
        from pipeline.models.global_batch_norm import to_global_batch_norm

        to_global_batch_norm(net)
    return net


def initial_state(cfg) -> dict:
    """The untrained network's weights for a full ``Config``: what every worker starts from.

    Seeds torch with ``train.seed`` first, so every caller (each DDP rank, the miner's first
    refresh, the untrained-network evaluation) gets the same initialisation.
    """
    import torch

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model).state_dict()
