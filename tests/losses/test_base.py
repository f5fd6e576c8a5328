import pytest
import torch

from pipeline.losses import LOSS_NAMES, build_loss


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_one_class_batch_is_a_clear_error(name):
    emb = torch.randn(6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="needs at least 2 distinct classes to have negatives"):
        build_loss(name)(emb, torch.full((6,), 3))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_malformed_inputs_are_clear_errors(name):
    loss = build_loss(name)
    with pytest.raises(ValueError, match="embeddings must be a floating \\(B, d\\) tensor"):
        loss(torch.randn(6), torch.arange(6))
    with pytest.raises(ValueError, match="labels must be \\(B,\\) = \\(6,\\)"):
        loss(torch.randn(6, 4), torch.arange(4))
    with pytest.raises(ValueError, match="labels must be integers"):
        loss(torch.randn(6, 4), torch.zeros(6))


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norms_up_to_1e3_give_finite_loss_and_gradients(name, dtype):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(8, 16, generator=gen, dtype=dtype)
    emb = 1e3 * emb / emb.norm(dim=1, keepdim=True)
    emb[4] = emb[2]  # coinciding rows of different classes (sqrt at 0 in the contrastive loss)
    emb.requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])  # class 0 drawn twice
    loss = build_loss(name)(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_cross_rank_is_a_no_op_without_a_process_group(name):
    emb, labels = torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    torch.testing.assert_close(build_loss(name, cross_rank=True)(emb, labels), build_loss(name)(emb, labels))
