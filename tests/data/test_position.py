"""The data position (resume) holder."""

from __future__ import annotations

import numpy as np
import pytest


def test_position_holds_sorted_unique_sample_ids():
    from pipeline.data.position import DataPosition

    pos = DataPosition()
    assert pos.set(np.asarray([5, -1, 3, 5, -1, 9])) == 3  # -1: a replaced image, not a sample
    assert pos.get().tolist() == [3, 5, 9] and pos.get().dtype == np.int64
    assert pos.set([]) == 0 and pos.get().size == 0
    with pytest.raises(ValueError, match="integers"):
        pos.set([1.5])
