"""The held-out set of evaluations during training, against the shards read with ``tarfile`` + PIL."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.data.manifest import ShardError
from pipeline.eval.heldout import HeldOutSet
from pipeline.eval.retrieval import retrieval_metrics
from pipeline.models import build_model


def _reference(holdout):
    """Key -> (label, HWC uint8 image) of every held-out sample, read with tarfile and PIL."""
    out = {}
    for tar in sorted(holdout.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                out[key] = (int(members[key + ".cls"].decode()), img)
    return out


def test_the_whole_set_when_max_images_covers_it(tiny_shards):
    ref = _reference(tiny_shards / "holdout")
    held = HeldOutSet(str(tiny_shards / "holdout"), 32, max_images=10_000)
    assert len(held) == len(ref) == 160 and held.num_classes == 20 and held.skipped == 0
    for key, label, img in zip(held.keys, held.labels, held.images):
        assert ref[key][0] == label
        np.testing.assert_array_equal(img, ref[key][1])


def test_a_cut_set_is_whole_shards_in_a_seeded_order_without_single_images(tiny_shards):
    a = HeldOutSet(str(tiny_shards / "holdout"), 32, max_images=45, seed=3)
    b = HeldOutSet(str(tiny_shards / "holdout"), 32, max_images=45, seed=3)
    c = HeldOutSet(str(tiny_shards / "holdout"), 32, max_images=45, seed=4)
    assert list(a.keys) == list(b.keys) and list(a.keys) != list(c.keys)
    assert 38 <= len(a) <= 45  # 45 read; a class cut to 1 image is dropped
    counts = np.bincount(a.labels)
    assert counts[counts > 0].min() >= 2


def test_evaluate_is_retrieval_of_the_eval_mode_embeddings(tiny_shards):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", embedding_dim=16))
    model.train()
    held = HeldOutSet(str(tiny_shards / "holdout"), 32, max_images=10_000)
    got = held.evaluate(model, torch.device("cpu"), ks=(1, 2), batch_size=7)
    assert model.training  # the mode is given back
    model.eval()
    with torch.no_grad():
        emb = model(torch.from_numpy(held.images)).numpy()
    want = retrieval_metrics(emb, held.labels, ks=(1, 2))
    assert got == pytest.approx(want, abs=1e-6)


def test_too_few_classes_is_refused_naming_the_set(tiny_shards):
    with pytest.raises(ShardError, match="eval.max_images"):
        HeldOutSet(str(tiny_shards / "holdout"), 32, max_images=9)
