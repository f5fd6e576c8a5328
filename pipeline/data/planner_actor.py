"""The run's batch planner as a named Ray actor: one answer per (step, rank) for the whole cluster.

A thin shell around :class:`pipeline.data.planner.BatchPlanner` (plain Python, unit-tested
without Ray). It adds what a cluster needs:

* **Attempts.** Every worker-group start (a fresh job, a rerun of ``train.run_name``, or Ray
  Train's restart after a failure) begins with rank 0 calling :meth:`PlannerActor.begin`
  with the step it resumes at and the planner state of that checkpoint (None: a fresh
  run). Plans made ahead by the previous attempt are dropped, the state is restored, and
  the other ranks wait at a barrier before they read their streams. Steps before the
  attempt's start are answered ``skip`` (a restarted worker group's streams start where
  the job started), so they cost a range row, never a read.
* **Lead.** Each rank's train loop says when it has trained a step (:meth:`PlannerActor.done`);
  a slice more than ``max_lead`` steps ahead of the slowest rank's training is answered
  ``wait`` after up to 10 s (an async actor: the call waits for the trainers without
  holding the actor; the fetch stage asks again), so every plan is made with class
  embeddings at most that many steps old, and the plans kept in memory stay bounded.
  (Counting the streams' fetches instead would let Ray Data plan the whole run ahead.)
* **Bad input.** Fetch reports a bad sample with :meth:`PlannerActor.replace`: it is counted
  per reason in the run's report (``pipeline.data.report``) and replaced by another unused
  sample of its class, so every slice stays whole. Samples the index left out (no image,
  no label, unknown label) and classes too small to pair are counted at start.
* **The report.** The planner is the one place that sees every planned sample, so it holds
  the bad-input report (``fetch``: the dict of :func:`pipeline.data.report.fetch_report`)
  and enforces ``data.max_bad_fraction``.

Size: the planner's state (per-class cursors, O(classes)) plus the plans in flight
(``max_lead`` x N x M ids); the index it reads is memory-mapped by the fetch stage, not held here.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from pipeline.data.report import DataQualityError, DataReport, check_bad_fraction


class PlannerActor:
    """Ray actor wrapping a :class:`BatchPlanner` over the train split's index (see the module docstring).

    ``selector``: None (``sampling`` picks uniform or proportional), or a picklable factory
    called with the kept classes' labels that returns a planner selector (the miner's,
    ``pipeline.mining.selector``). ``random_every`` > 0: every that many steps every rank's slice
    also carries its share of a *side* batch of the same shape as the plan: N classes drawn
    uniformly (the same draw on every rank, from its own rng; rank r gets classes
    ``r*N/W .. (r+1)*N/W - 1``) with M samples each, not consumed. Gathered across ranks next
    to the trained global batch, it measures how much harder the planned batch is.
    ``max_passes`` > 0 (``data.epochs``): slices past that many passes are answered ``end``.
    """

    def __init__(self, index_root: str, classes_per_batch: int, images_per_class: int, world_size: int, seed: int,
                 sampling: str = "uniform", max_lead: int = 64, max_bad_fraction: float = 1.0,
                 selector=None, random_every: int = 0, max_passes: int = 0, cache_dir: str = "") -> None:
        from pipeline.data.cache import is_remote, local_root
        from pipeline.data.index import class_ranges, load_index

        # A URI: the index from this node's cache (pipeline.data.cache); the planner reads no shard.
        index = load_index(local_root(index_root, cache_dir), "train", missing_ok=is_remote(index_root),
                           allow_cut=True)
        self.paths = list(index.paths)
        class_ids, starts, counts = class_ranges(index)
        self.report = DataReport()
        self._count_left_out(index, class_ids, counts, images_per_class)
        keep = counts >= images_per_class
        self.ranges = (class_ids[keep], starts[keep], counts[keep])
        self.selector = selector(self.ranges[0]) if selector is not None else None
        self.args = dict(classes_per_batch=classes_per_batch, images_per_class=images_per_class,
                         world_size=world_size, seed=seed, sampling=sampling, max_lead=max_lead,
                         selector=self.selector)
        self.index_shard = np.asarray(index.shard)
        self.max_bad_fraction, self.random_every, self.max_passes = max_bad_fraction, random_every, max_passes
        self.planner = None
        self.start, self.attempt, self.seen = 0, 0, 0
        self.done_through: dict[int, int] = {}  # rank -> last step it reported trained (this attempt)
        # Sample ids found bad: at most data.max_bad_fraction of the samples before the run stops
        # (1% of CASIA-WebFace: 5k ids, ~0.4 MB as a Python set; of WebFace42M: 420k, ~30 MB).
        self.known_bad: set[int] = set()
        self.selected: dict[int, dict] = {}  # step -> the miner's answer when it was planned
        self._event = asyncio.Event()  # set (and replaced) whenever a waiting slice may go on

    def _count_left_out(self, index, class_ids, counts, m: int) -> None:
        import json
        from pathlib import Path

        header = json.loads((Path(index.root) / f"index-{index.split}.json").read_text())
        items = [(s["shard"], s["key"], s["reason"]) for s in header.get("skipped", [])]
        for cid, n in zip(class_ids, counts):
            if n < m:
                items += [(f"class {int(cid)}", f"{int(n)} image(s)", "small_class")] * int(n)
        self.report.add(items)

    async def begin(self, start_step: int, state: dict | None) -> int:
        """Start an attempt at ``start_step`` from a checkpoint's planner ``state`` (None: fresh). Returns its number.

        Raises ValueError when a fresh start is asked at a step > 0 (a checkpoint without
        planner state: an older format).
        """
        from pipeline.data.planner import BatchPlanner

        if state is None:
            if start_step:
                raise ValueError(f"resuming at step {start_step} needs the checkpoint's planner state; this "
                                 f"checkpoint has none (written by an older version): use a new train.run_name")
            self.planner = BatchPlanner(*self.ranges, **self.args)
        else:
            state = {k: (np.asarray(v) if hasattr(v, "__len__") else int(v)) for k, v in state.items()}
            self.planner = BatchPlanner.from_state(*self.ranges, state=state, **self.args)
        self.start, self.selected, self.done_through = int(start_step), {}, {}
        self.attempt += 1
        self._wake()
        return self.attempt

    def _wake(self) -> None:
        """Wake every ``slice`` call waiting for the trainers (the planner's lead moved or an attempt began)."""
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def slice(self, step: int, rank: int, wait_s: float = 10.0) -> dict:
        """Rank ``rank``'s part of plan ``step``: ``{"sample_ids", "labels", "pass"}`` (+ ``side_ids``,
        ``side_labels`` and the miner's selection info on rank 0), or ``{"skip": True}`` for a
        step before this attempt's start, ``{"wait": True}`` when it is too far ahead (or no
        attempt has begun), ``{"end": True}`` past ``max_passes``. Raises DataQualityError past ``data.max_bad_fraction``."""
        # Waits here (an async actor: other calls go on) instead of the fetch stage polling.
        deadline = time.monotonic() + wait_s
        while self.planner is None or (step >= self.start and not self.planner.can_plan(step)):
            left = deadline - time.monotonic()
            if left <= 0:
                return {"wait": True}
            try:
                await asyncio.wait_for(self._event.wait(), timeout=left)
            except asyncio.TimeoutError:
                return {"wait": True}
        if step < self.start:
            return {"skip": True}
        while self.planner.next_step <= step:  # one step at a time: each selection is timed and recorded
            new = self.planner.next_step
            t0 = time.perf_counter()
            if self.selector is not None:
                self.selector.step = new  # miner.warmup_steps: uniform classes before it
            self.planner.plan(new)
            self.seen += self.args["classes_per_batch"] * self.args["images_per_class"]
            self.report.add([], seen=self.seen)
            if self.selector is not None:
                self.selected[new] = {"select_ms": 1000.0 * (time.perf_counter() - t0),
                                      "miner_version": int(getattr(self.selector, "last_version", -1)),
                                      "fallbacks": int(getattr(self.selector, "fallbacks", 0))}
        plan = self.planner.plan(step)
        self._check()
        if self.max_passes and plan.pass_index >= self.max_passes:
            return {"end": True}
        part = plan.slice(rank)
        known = [int(i) for i in part.sample_ids if int(i) in self.known_bad]
        if known:
            # Found bad in an earlier pass after this step's pass was planned (the planner skips
            # bad ids only in passes that start later): swapped now, not read or counted again.
            none_left = [i for i in known if self.planner.replace(step, rank, i) is None]
            part = plan.slice(rank)
        ids = part.sample_ids
        if known and none_left:  # the class has no unused sample left: the stream copies a classmate (-1)
            ids = np.where(np.isin(ids, none_left), -1, ids)
        out = {"sample_ids": ids, "labels": part.labels, "pass": int(plan.pass_index)}
        if rank == 0:
            # get, not pop: a fetch actor that asked ahead may drop the part and ask again
            # (the entries go when every rank has taken the step, in done()).
            out.update(self.selected.get(step, {}))
        if self.random_every and step % self.random_every == 0:
            out["side_ids"], out["side_labels"] = self._side(step, rank)
        return out

    async def slices(self, steps: list[int], rank: int, wait_s: float = 10.0) -> list[dict]:
        """:meth:`slice` of each of ``steps`` in order, in one call: the parts up to the first step that
        must wait (that one waits up to ``wait_s``, as :meth:`slice`); at least one entry, which may
        be ``{"wait": True}``. A fetch actor asks for its whole block at once: one call per block
        instead of one per step (~2 ms of the planner's CPU per call on this machine)."""
        out = []
        for i, step in enumerate(steps):
            part = await self.slice(step, rank, wait_s if i == 0 else 0.0)
            if part.get("wait") and out:
                break
            out.append(part)
            if part.get("wait") or part.get("end"):
                break
        return out

    def _side(self, step: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank ``rank``'s share ``(sample ids, labels)`` of step ``step``'s random side batch: the
        global draw (N classes x M samples) is the same on every rank, each keeps its N/W classes."""
        labels, starts, counts = self.ranges
        m, n, w = self.args["images_per_class"], self.args["classes_per_batch"], self.args["world_size"]
        rng = np.random.default_rng([self.args["seed"], step, 0x51DE])
        classes = rng.choice(len(labels), size=n, replace=False)
        ids = np.concatenate([starts[c] + rng.choice(counts[c], size=m, replace=False) for c in classes])
        own = np.s_[rank * (n // w) * m:(rank + 1) * (n // w) * m]
        return ids[own].astype(np.int64), np.repeat(labels[classes], m)[own].astype(np.int64)

    async def done(self, step: int, rank: int) -> None:
        """Rank ``rank`` has trained every step up to ``step`` (its stream made its last ``replace``
        for them before). Trainers call it every few steps, not after each (``pipeline.train.loop``)."""
        if self.planner is None or step < self.start:
            return
        first = max(self.start, self.done_through.get(rank, -1) + 1)
        try:
            for s in range(first, step + 1):
                self.planner.take(s, rank)
        except ValueError:
            return  # a step of the previous attempt, reported after begin(): nothing to take
        self.done_through[rank] = max(step, self.done_through.get(rank, -1))
        slowest = self.planner.slowest()
        for s in [s for s in self.selected if s < slowest]:
            del self.selected[s]
        self._wake()

    async def replace(self, step: int, rank: int, sample_id: int, reason: str, key: str = "") -> int:
        """Count ``sample_id`` as bad for ``reason`` and return another unused sample of its class (-1: none left).

        Raises DataQualityError once bad samples exceed ``data.max_bad_fraction``.
        """
        self._count_bad(sample_id, reason, key)
        new = self.planner.replace(step, rank, int(sample_id))
        self._check()
        return -1 if new is None else int(new)

    async def report_bad(self, sample_ids: list[int], reason: str) -> None:
        """Count samples found bad after their slice was handed out (a trainer's GPU decode,
        ``data.decode_device: cuda``): counted once, never planned again; no replacement is drawn
        (the trainer filled their slots with classmates). Raises DataQualityError as :meth:`replace`."""
        for sid in sample_ids:
            self._count_bad(sid, reason)
        self._check()

    def _count_bad(self, sample_id: int, reason: str, key: str = "") -> None:
        if int(sample_id) not in self.known_bad:
            # Counted once: a slice fetched ahead, or another rank's slice of a later pass, can
            # still hold a sample that was found bad after it was handed out.
            shard = self.paths[int(self.index_shard[sample_id])]
            self.report.add([(shard, key or f"sample {sample_id}", reason)])
            self.known_bad.add(int(sample_id))

    def _check(self) -> None:
        """Raise DataQualityError when the bad fraction so far exceeds ``data.max_bad_fraction``."""
        r = self.report
        check_bad_fraction(r.counts, r.seen, self.max_bad_fraction, r.items)

    async def state_dict(self, step: int) -> dict:
        """The planner's state as of ``step`` (for a checkpoint of that step), as numpy arrays and ints."""
        return self.planner.state_dict(step)

    async def fetch(self) -> dict:
        """The bad-input report (``pipeline.data.report.fetch_report``'s dict), with the finished passes' leftovers as ``unused``."""
        out = self.report.fetch()
        out["unused"] = int(sum(self.planner.unused)) if self.planner is not None else 0
        out["pass"] = int(self.planner.pass_index) if self.planner is not None else 0
        return out


def create_planner(name: str, *args, **kwargs):
    """The run's named :class:`PlannerActor` (restarted by Ray if its process dies); returns the handle.

    Keep the handle referenced while training runs. A restarted actor starts empty and
    answers ``wait`` until the next attempt's :meth:`PlannerActor.begin`; the train loop
    fails its attempt when the planner stops answering, and Ray Train restarts from the
    last checkpoint (``train.max_failures``).
    """
    import ray

    # Async methods, one event loop: calls never run concurrently with each other, and a
    # slice waiting for the trainers does not hold up done() or the other ranks.
    cls = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=0)(PlannerActor)
    return cls.options(name=name, get_if_exists=True).remote(*args, **kwargs)


__all__ = ["DataQualityError", "PlannerActor", "create_planner", "planner_name"]


def planner_name(run_id: str) -> str:
    """The planner actor's name for MLflow run ``run_id``."""
    return f"planner-{run_id}"
