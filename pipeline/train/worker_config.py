"""What the driver hands each Ray Train worker: the config and the run's actors, typed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import Config, config_from_dict, to_dict


@dataclass
class WorkerConfig:
    cfg: Config
    """The resolved job config (``data.image_size`` already resolved by the driver)."""
    tracking_uri: str
    """MLflow tracking URI the run lives in."""
    run_id: str
    """The MLflow run (new, or reopened when resuming)."""
    planner: str
    """Name of the batch planner actor (``pipeline.data.planner_actor``)."""
    refresher: str | None = None
    """Name of the mining refresher actor when ``miner.enabled``, else None."""
    class_models: dict[int, int] | None = None
    """Class id -> vehicle-model id for the Mixed Difference Network (``model.arch: mixed_diff``), else None."""
    resume_from: str | None = None
    """A checkpoint directory to start from when Ray Train has none for this run (its snapshot was lost), else None."""

    def to_dict(self) -> dict:
        """Plain types for ``TorchTrainer(train_loop_config=...)``."""
        out = dataclasses.asdict(self)
        out["cfg"] = to_dict(self.cfg)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> WorkerConfig:
        d = dict(d)
        d["cfg"] = config_from_dict(d["cfg"])
        if d.get("class_models"):
            d["class_models"] = {int(k): int(v) for k, v in d["class_models"].items()}
        return cls(**d)
