"""The loop's checkpoint protocol: when a checkpoint is due, what it holds, resuming from one.

A checkpoint is due at the last step, every ``train.checkpoint_every`` steps, and at every
evaluation step (``eval.every``), so that each evaluated state can be the run's best. Only
rank 0 writes one (``pipeline.train.checkpoint.save_checkpoint``: weights, optimizer,
scheduler, RNG, step, MLflow run id, the planner's state as of the step); every rank calls
``ray.train.report`` at the same steps with its metrics. The metrics that go with a
checkpoint carry ``eval_score`` (:data:`SCORE`): the step's ``eval.metric``, or -inf for a
checkpoint without an evaluation, which Ray Train ranks below every evaluated one
(``CheckpointConfig(checkpoint_score_attribute=SCORE)``: it keeps the best
``num_to_keep`` plus always the latest, which resuming needs).
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from pipeline.train.checkpoint import load_checkpoint_dir, save_checkpoint, set_rng_state

SCORE = "eval_score"
"""The reported metric Ray Train ranks checkpoints by (higher is better)."""


class Checkpointer:
    """Checkpoints of one worker (``rank``) of the run ``run_id``; ``planner`` is the planner actor's name."""

    def __init__(self, cfg, run_id: str, planner: str, rank: int, world: int, evaluates: bool) -> None:
        self.steps, self.every = cfg.train.steps, cfg.train.checkpoint_every
        self.eval_every = cfg.eval.every if evaluates else 0
        self.evaluates = evaluates
        self.run_id, self.planner, self.rank, self.world = run_id, planner, rank, world

    def eval_due(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps done) is an evaluation step: every ``eval.every``, and the last."""
        return self.evaluates and (step >= self.steps or bool(self.eval_every and step % self.eval_every == 0))

    def due(self, step: int) -> bool:
        return step >= self.steps or bool(self.every and step % self.every == 0) or self.eval_due(step)

    @staticmethod
    def load(fallback: str | None) -> dict | None:
        """The latest complete checkpoint Ray Train holds for this run, else the one at ``fallback`` (None: fresh start).

        ``fallback`` is a checkpoint the driver found when Ray Train's run snapshot was lost
        (``pipeline.train.checkpoint.latest_checkpoint``); once this job reports a checkpoint,
        Ray's own takes over.
        """
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and fallback:
            ckpt = ray.train.Checkpoint(fallback)
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint_dir(d)

    def restore(self, state: dict, optimizer, scheduler) -> tuple[int, dict | None]:
        """Optimizer, scheduler and RNG states from ``state``; returns ``(step, planner state)``.

        (The weights are loaded by the caller before DDP wraps the model.) Raises RuntimeError
        when the checkpoint belongs to another MLflow run.
        """
        if state["run_id"] != self.run_id:
            raise RuntimeError(f"the checkpoint of step {state['step']} belongs to MLflow run {state['run_id']}, "
                               f"this job logs to {self.run_id}: use a new train.run_name")
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if self.rank == 0:
            print(f"[train] resuming from the checkpoint of step {state['step']}", flush=True)
        return int(state["step"]), state.get("planner")

    def report(self, step: int, metrics: dict, module: torch.nn.Module, optimizer, scheduler,
               score: float | None = None) -> None:
        """``ray.train.report(metrics)`` of this rank, with rank 0's checkpoint when one is :meth:`due`.

        ``score``: the step's ``eval.metric`` (rank 0), reported as :data:`SCORE`.
        """
        import ray.train

        save = self.due(step)
        if save and self.evaluates:
            metrics = {**metrics, SCORE: float("-inf") if score is None else float(score)}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if save and self.rank == 0:
                # Written completely (model.pt, then meta.json) before Ray sees the directory.
                # The planner's state as of this step: where every rank's stream goes on.
                save_checkpoint(tmp, module, optimizer, step, self.run_id, planner_state=self._planner_state(step),
                                world_size=self.world, scheduler=scheduler)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def _planner_state(self, step: int) -> dict:
        """The planner's state as of ``step``, as tensors and ints (``torch.load(weights_only=True)`` reads them back)."""
        import ray

        state = ray.get(ray.get_actor(self.planner).state_dict.remote(step), timeout=120)
        # Copies: arrays that come out of the object store may be views of one buffer, which torch.save refuses.
        return {k: (torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v)
                for k, v in state.items()}
