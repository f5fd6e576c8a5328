import torch

from pipeline.losses.distances import squared_distances


def test_matches_explicit_differences():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(3, 7, generator=gen, dtype=torch.float64)
    expected = torch.tensor([[float(((a[i] - b[j]) ** 2).sum()) for j in range(3)] for i in range(5)], dtype=a.dtype)
    torch.testing.assert_close(squared_distances(a, b), expected, rtol=1e-12, atol=1e-12)
    assert (squared_distances(a, a).diagonal() >= 0).all()
