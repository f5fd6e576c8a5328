"""Models: embedding heads, IResNet, the Mixed Difference Network and its model-branch loss; configs load."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import EmbeddingNet, MixedDifferenceNet, build_model, model_branch_loss
from pipeline.models.embedding import build_backbone

REPO = Path(__file__).resolve().parents[2]


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("head", ["linear", "linear_bn"])
@pytest.mark.parametrize("normalize", [False, True])
def test_embedding_net_shapes_and_heads(head, normalize):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", embedding_dim=12, normalize=normalize, head=head))
    assert isinstance(model, EmbeddingNet)
    z = model(_images(6, 32))
    assert z.shape == (6, 12) and z.dtype == torch.float32
    if normalize:
        torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    if head == "linear_bn":
        assert isinstance(model.head[1], nn.BatchNorm1d) and model.head[0].bias is None
        if not normalize:  # batch norm in training mode: each dimension centred over the batch
            torch.testing.assert_close(z.mean(0), torch.zeros(12), atol=1e-5, rtol=0)
    else:
        assert isinstance(model.head, nn.Linear)
        # checkpoints of the plain head keep their keys
        assert {"head.weight", "head.bias"} <= set(model.state_dict())


def test_float_nchw_input_matches_uint8_nhwc():
    model = build_model(ModelConfig(backbone="tiny", embedding_dim=8)).eval()
    x = _images(3, 32)
    torch.testing.assert_close(model(x), model(x.permute(0, 3, 1, 2).float()))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="model.backbone"):
        build_model(ModelConfig(backbone="vgg"))
    with pytest.raises(ValueError, match="model.head"):
        build_model(ModelConfig(backbone="tiny", head="mlp"))
    with pytest.raises(ValueError, match="model.arch"):
        build_model(ModelConfig(backbone="tiny", arch="siamese"))
    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, ["model.head=mlp"])
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=siamese"])
    with pytest.raises(ConfigError, match="loss.model_branch_weight"):
        load_config(None, ["loss.model_branch_weight=-1"])
    with pytest.raises(ValueError, match="model.norm"):
        build_model(ModelConfig(backbone="tiny", norm="layer"))
    with pytest.raises(ConfigError, match="model.norm"):
        load_config(None, ["model.norm=layer"])


def _macs(trunk: nn.Module, size: int) -> float:
    """Multiply-adds of one forward pass on a (1, 3, size, size) image (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trunk.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 2


def test_small_backbone_costs_what_the_peer_cnn_costs():
    """``small``: 10-15 M multiply-adds per 64 px image (issue 17's peer CNN: ~13 M), 256-d features."""
    trunk, dim = build_backbone("small")
    # By hand: 32x32x32x(5x5x3) + 16x16x64x(3x3x32) + 4x4x128x(3x3x64) + 4x4x256x(3x3x128) convs,
    # plus the pools (the counter counts convolutions and matmuls only).
    by_hand = 32 * 32 * 32 * 75 + 16 * 16 * 64 * 288 + 4 * 4 * 128 * 576 + 4 * 4 * 256 * 1152
    assert _macs(trunk, 64) == by_hand == 13_074_432
    assert 3 * _macs(build_backbone("tiny")[0], 64) < by_hand < _macs(build_backbone("resnet18")[0], 64) / 10
    assert dim == 256 and trunk(torch.zeros(2, 3, 64, 64)).shape == (2, 256)
    assert trunk(torch.zeros(2, 3, 32, 32)).shape == (2, 256)  # the tests' 32 px images still fit


@pytest.mark.parametrize("backbone", ["tiny", "small", "resnet18", "iresnet18"])
def test_group_norm_replaces_every_batchnorm2d(backbone):
    bn_trunk, _ = build_backbone(backbone)
    gn_trunk, _ = build_backbone(backbone, norm="group")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn_trunk.modules())
    gns = [m for m in gn_trunk.modules() if isinstance(m, nn.GroupNorm)]
    assert n_bn > 0 and len(gns) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn_trunk.modules())
    for m in gns:
        assert m.num_channels % m.num_groups == 0 and m.num_groups <= 32
        assert m.num_groups == max(g for g in range(1, 33) if m.num_channels % g == 0)


def test_group_norm_embedding_does_not_depend_on_batch_companions():
    """The point of norm=group for mining: in train mode an image's embedding is its own."""
    for norm, independent in (("group", True), ("batch", False)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone="tiny", embedding_dim=8, norm=norm)).train()
        a, b = _images(4, 32, seed=1), _images(4, 32, seed=2)
        with torch.no_grad():
            alone = model(a)
            mixed = model(torch.cat([a, b]))[:4]
        assert torch.allclose(alone, mixed, atol=1e-5) == independent, norm


def test_batchnorm_weights_load_into_group_norm(tmp_path):
    torch.manual_seed(0)
    trunk, _ = build_backbone("tiny")
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    torch.save(trunk.state_dict(), tmp_path / "w.pt")
    gn_trunk, _ = build_backbone("tiny", weights=str(tmp_path / "w.pt"), norm="group")
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    gns = [m for m in gn_trunk.modules() if isinstance(m, nn.GroupNorm)]
    for bn, gn in zip(bns, gns, strict=True):
        torch.testing.assert_close(gn.weight, bn.weight)
        torch.testing.assert_close(gn.bias, bn.bias)


# --- IResNet ----------------------------------------------------------------------------


def test_iresnet18_on_112_faces():
    torch.manual_seed(0)
    trunk, dim = build_backbone("iresnet18")
    assert dim == 512 * 7 * 7
    model = build_model(ModelConfig(backbone="iresnet18", embedding_dim=32, head="linear_bn")).eval()
    with torch.inference_mode():
        assert model(_images(1, 112)).shape == (1, 32)
        assert model(_images(1, 32)).shape == (1, 32)  # other sizes are pooled to 7x7


def test_iresnet50_depth():
    trunk, dim = build_backbone("iresnet50")
    assert [len(s) for s in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)] == [3, 4, 14, 3]
    # insightface's r50 has ~43.6M parameters, of which its 25088 x 512 fc + BN head is ~12.85M
    assert 30e6 < sum(p.numel() for p in trunk.parameters()) < 32e6 and dim == 25088


def test_iresnet_weights_load_by_insightface_names(tmp_path):
    trunk, _ = build_backbone("iresnet18")
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in trunk.state_dict().items()}
    assert "layer1.0.bn1.weight" in state and "prelu.weight" in state
    state["fc.weight"] = torch.zeros(3)  # an insightface checkpoint's head: ignored
    torch.save(state, tmp_path / "backbone.pth")
    loaded, _ = build_backbone("iresnet18", str(tmp_path / "backbone.pth"))
    assert torch.equal(loaded.layer1[0].bn1.weight, torch.full((64,), 0.5))


# --- Mixed Difference Network -----------------------------------------------------------


def _mdn(**kw) -> MixedDifferenceNet:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", embedding_dim=10, arch="mixed_diff", num_vehicle_models=7, **kw)
    model = build_model(cfg)
    assert isinstance(model, MixedDifferenceNet)
    return model


@pytest.mark.parametrize("head", ["linear", "linear_bn"])
def test_mdn_forward_and_forward_train_shapes(head):
    model = _mdn(head=head, normalize=True)
    x = _images(5, 32)
    emb, logits = model.forward_train(x)
    assert emb.shape == (5, 10) and logits.shape == (5, 7)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    model.eval()
    with torch.inference_mode():
        z = model(x)  # evaluation path: the embedding alone, like EmbeddingNet
        z2, _ = model(x, return_logits=True)
    assert z.shape == (5, 10)
    torch.testing.assert_close(z, z2)


def test_mdn_every_parameter_gets_a_gradient_in_training():
    # DDP without find_unused_parameters needs every parameter used on the training path.
    model = _mdn()
    emb, logits = model(_images(4, 32), return_logits=True)
    (emb.square().sum() + model_branch_loss(logits, torch.tensor([0, -1, 3, 6]))).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_mdn_evaluates_with_the_embedding_api(tmp_path):
    """The evaluator builds the model from the config dict and calls model(images)."""
    import dataclasses

    cfg = ModelConfig(backbone="tiny", embedding_dim=10, arch="mixed_diff", num_vehicle_models=7)
    state = build_model(cfg).state_dict()
    again = build_model(ModelConfig(**dataclasses.asdict(cfg)))
    again.load_state_dict(state)
    assert again.eval()(_images(2, 32)).shape == (2, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_branch_loss_ignores_unknown_models(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.tensor([2, -1, 0, 4, -1, 2])
    loss = model_branch_loss(logits, labels)
    # reference: explicit loop over the samples with a known model
    terms = []
    for row, y in zip(logits.detach().tolist(), labels.tolist()):
        if y == -1:
            continue
        m = max(row)
        terms.append(m + math.log(sum(math.exp(v - m) for v in row)) - row[y])
    expected = sum(terms) / len(terms)
    assert loss.dtype == dtype
    assert abs(loss.item() - expected) < (1e-5 if dtype == torch.float32 else 1e-12)
    loss.backward()
    assert torch.all(logits.grad[labels == -1] == 0) and torch.any(logits.grad[labels != -1] != 0)


def test_model_branch_loss_all_unknown_is_zero_with_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = model_branch_loss(logits, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_model_branch_loss_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="num_vehicle_models"):
        model_branch_loss(torch.zeros(2, 4), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="num_vehicle_models"):
        model_branch_loss(torch.zeros(2, 4), torch.tensor([1, -2]))


# --- configs ----------------------------------------------------------------------------

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_says_what_it_is(path):
    cfg = load_config(path)
    assert path.read_text().startswith("#"), f"{path.name}: document the config at the top"
    m = cfg.model
    _builds(m.backbone, m.arch, m.head)  # the model it names exists
    # Augmentation depends on the data (a mirror image may be another class): every config
    # chooses it and says why, on the line that sets it.
    line = next((ln for ln in path.read_text().splitlines() if ln.strip().startswith("augment:")), "")
    assert "#" in line and len(line.split("#", 1)[1].strip()) > 20, f"{path.name}: set data.augment and say why"


@functools.lru_cache(maxsize=None)
def _builds(backbone: str, arch: str, head: str) -> bool:
    build_model(ModelConfig(backbone=backbone, arch=arch, head=head))
    return True


def test_seed_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"webface_npair.yaml", "webface_npair_hnm.yaml", "vehicleid_triplet.yaml", "vehicleid_ccl.yaml",
            "vehicleid_mixed_diff.yaml"} <= names
    hnm = load_config(REPO / "configs" / "webface_npair_hnm.yaml")
    assert hnm.miner.enabled and hnm.model.backbone == "iresnet50"
    mdn = load_config(REPO / "configs" / "vehicleid_mixed_diff.yaml")
    assert mdn.model.arch == "mixed_diff" and mdn.loss.name == "coupled_clusters"
