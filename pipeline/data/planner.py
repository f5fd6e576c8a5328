"""The batch planner: which samples every rank trains at every step, in O(classes) state.

Sample model (fixed by the shard index): every training sample has an integer *sample id*,
its row in the per-sample index, and the samples of one class are one contiguous id range.
The planner is given, per class ``i``, its label ``class_ids[i]`` and its range
``starts[i] .. starts[i] + counts[i] - 1``; it never holds a per-sample array.

What it owns
------------
* **The pass** (epoch). Position ``q`` of class ``i`` in pass ``p`` is sample
  ``starts[i] + perm(seed, p, i)(q)``, where ``perm`` is a seeded bijection of
  ``[0, counts[i])`` computed on demand, and a per-class *cursor* says how many positions
  the pass has used. Why a bijection and not stored or cached permutations: seeding a
  NumPy ``Generator`` and permuting one class costs 18-31 us (measured here, 47 and 800
  samples), so a step of 192 fresh classes would spend 3.5-6 ms on it, and a cache that
  would help uniform sampling must hold about every class, i.e. O(samples). The bijection
  costs about 0.3 ms for a whole step, needs no memory, and is exact. It is a 6-round
  Feistel network on the smallest power of two >= n with cycle-walking for classes of
  more than 32 samples (checked here: position and pair frequencies over 20-40k keys
  match uniform for n >= 33; fewer rounds or smaller domains were visibly biased), and for
  classes of at most 32 samples a sort of 64-bit hashes of the positions, which is an
  exactly uniform permutation and cheap at that size.
* **Plans.** ``plan(step)`` draws ``classes_per_batch`` (N) distinct *active* classes
  (those with >= ``images_per_class`` (M) unused good samples left this pass) through a
  pluggable :class:`Selector`, takes the next M positions of each, and returns a
  :class:`StepPlan` cut into ``world_size`` (W) slices of N/W classes. Random selection is
  :func:`select_uniform` or, so that classes run out together, proportional to what each
  class has left (drawn by rejection against the largest count left, ~O(N)). Steps are planned in
  order; every ask for a planned step gets the same object. A plan is dropped once every
  rank has called ``take(step, rank)``.
* **The lead.** ``plan(step)`` raises :class:`PlanAhead` when ``step`` is more than
  ``max_lead`` steps ahead of the slowest rank's next untaken step (``can_plan`` answers
  without raising); the Ray actor that wraps the planner waits and retries.
* **End of pass.** When fewer than N classes are active before a step is planned, the
  pass ends: the good samples it left are counted (``unused``, the ``data/unused``
  metric), and the step is planned in the next pass (new permutations, cursors at 0).
* **Bad samples.** ``replace(step, rank, sample_id)`` gives another unused sample of the
  same class (from the pass of that plan) for a sample found bad at fetch time, and
  remembers the bad id (O(bad)); passes that start after the report skip it.

Resume, exactly
---------------
The selection rng of step s is seeded by ``(seed, s)`` alone, so a plan is a function of
the planner's position (pass, cursors, bad ids, active order) and the step. Every change
is logged with what it overwrote (a plan: the cursors it advanced, the classes it
deactivated, the pass it ended; a replacement: the cursor it advanced), so
``state_dict(step)`` undoes, on copies, everything from the planning of ``step`` on and
returns the position *as of step*, even when later steps are already planned (also
across a pass boundary). A replacement made after ``step`` was planned for an earlier,
already-trained step cannot be undone (its sample was trained); it is put in the state as
*deferred* (after which planned step it happened, and what it drew), and a restored
planner re-applies it at that same point, so the plans from ``step`` on equal those of
the uninterrupted planner. Because undo runs in reverse time order, cursors come back
exactly and no list of given-back positions ("holes") is needed.

The state is a flat ``dict[str, int | np.ndarray]`` of integer arrays and Python ints: it
survives ``np.savez``/``np.load(allow_pickle=False)``; for a ``torch.load(weights_only=True)``
checkpoint convert each array with ``torch.from_numpy`` (and back with ``.numpy()``).
Its size is ``4 * (C + A) + 40 * bad + 56 * deferred`` bytes, with C classes and A
<= C active classes (their order is kept, see ``_PassState``): at CASIA-WebFace (10,575
classes) at most 85 KB, at WebFace42M (2M classes) at most 16 MB, whatever the pass or
step (the old consumed-id list was 123 MB at CASIA and grew by the epoch). In memory the
planner holds three int64 and five int32 arrays per class, 44 bytes (88 MB at 2M classes),
one more copy of the int32 ones for a pass that ended within the last ``rewind_window``
steps, and ~16 * N bytes of undo record per step of that window (3 MB at N = 192 and
the default window of 1,024 steps).

This module knows nothing of Ray or torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

STATE_VERSION = 1
_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_ONE = _U64(1)
_FEISTEL_ROUNDS = 6
_SMALL = 32  # classes up to this size are permuted by sorting hashes (see module docstring)


class PlanAhead(RuntimeError):
    """Raised by :meth:`BatchPlanner.plan` for a step more than ``max_lead`` ahead of the slowest rank.

    Not an error of the caller: retry once the slowest rank has taken its slice.
    """

    def __init__(self, step: int, slowest: int, max_lead: int) -> None:
        super().__init__(
            f"step {step} is more than max_lead={max_lead} steps ahead of the slowest rank "
            f"(next untaken step {slowest}); retry after it takes its slice"
        )
        self.step = step
        self.slowest = slowest
        self.max_lead = max_lead


class Selector(Protocol):
    """Chooses the classes of one step.

    ``active``: the class indices (0..C-1, positions in the planner's arrays, not labels)
    that have at least M unused samples, in a deterministic but unspecified order; a view,
    do not modify. ``remaining``: for every class index, its unused good samples this pass
    (read-only; inactive classes have fewer than M). ``rng`` is seeded by (seed, step), so
    a selector that draws only from it keeps plans reproducible. Returns ``n`` distinct
    class indices taken from ``active`` (the planner checks and raises ValueError if not).
    """

    def __call__(
        self, active: np.ndarray, n: int, rng: np.random.Generator, remaining: np.ndarray
    ) -> np.ndarray: ...


def select_uniform(active: np.ndarray, n: int, rng: np.random.Generator, remaining: np.ndarray) -> np.ndarray:
    """``n`` distinct classes of ``active``, uniformly; O(n) for large ``active``."""
    return active[rng.choice(active.size, size=n, replace=False)]


def select_proportional(
    active: np.ndarray, n: int, rng: np.random.Generator, remaining: np.ndarray
) -> np.ndarray:
    """``n`` distinct classes of ``active``, drawn successively with probability proportional
    to their remaining samples, so that classes run out together; O(len(active)).

    The planner recognises this function (``sampling="proportional"``) and draws the same
    distribution by rejection in ~O(n), see ``BatchPlanner._select_proportional``."""
    weights = remaining[active].astype(np.float64)
    return rng.choice(active, size=n, replace=False, p=weights / weights.sum())


@dataclass(frozen=True)
class RankSlice:
    """What rank ``rank`` trains at ``step``: N/W classes x M samples, grouped by class."""

    step: int
    rank: int
    sample_ids: np.ndarray
    """int64 (N/W * M,): global sample ids; ids ``[j*M:(j+1)*M]`` belong to class ``j`` of the slice."""
    labels: np.ndarray
    """int64 (N/W * M,): the label of each sample (``class_ids`` of its class)."""


@dataclass
class StepPlan:
    """The global batch of one step. The planner writes replacements into ``sample_ids``;
    callers must not modify the arrays."""

    step: int
    pass_index: int
    """The pass (epoch) this step's samples come from."""
    classes: np.ndarray
    """int64 (N,): class indices (positions in the planner's arrays), in slice order."""
    sample_ids: np.ndarray
    """int64 (N*M,): samples of ``classes[j]`` are ``sample_ids[j*M:(j+1)*M]``."""
    labels: np.ndarray
    """int64 (N*M,): the label of each sample."""
    world_size: int
    images_per_class: int
    replaced: dict[int, int | None] = field(default_factory=dict)
    """Bad sample id -> the id that replaced it (None: its class had none left)."""

    def slice(self, rank: int) -> RankSlice:
        """Rank ``rank``'s part (classes ``rank*N/W .. (rank+1)*N/W - 1`` of the plan), as copies.

        Raises ValueError when ``rank`` is not in ``[0, world_size)``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        width = self.sample_ids.size // self.world_size
        part = np.s_[rank * width : (rank + 1) * width]
        return RankSlice(self.step, rank, self.sample_ids[part].copy(), self.labels[part].copy())


@dataclass
class _PassState:
    """Where one pass stands. ``active[:n_active]`` are the active classes; a class that runs
    out is swap-removed (O(1)), so the order depends on the pass's history and is part of
    the saved state (rebuilding a sorted list each step costs ~8 ms at 1M classes)."""

    index: int
    cursor: np.ndarray  # int32 (C,): positions of the permutation used
    bad_left: np.ndarray  # int32 (C,): known-bad ids of the class at positions >= cursor
    remaining: np.ndarray  # int32 (C,): counts - cursor - bad_left (good samples left)
    active: np.ndarray  # int32 (C,)
    where: np.ndarray  # int32 (C,): position in active, -1 when inactive
    n_active: int
    skip: frozenset[int]  # bad ids this pass skips
    by_remaining: np.ndarray  # int64 (max count + 1,): active classes per remaining count
    top: int  # the largest remaining count of an active class

    def copy(self) -> _PassState:
        return _PassState(
            self.index, self.cursor.copy(), self.bad_left.copy(), self.remaining.copy(),
            self.active.copy(), self.where.copy(), self.n_active, self.skip,
            self.by_remaining.copy(), self.top,
        )


@dataclass
class _PlanUndo:
    """What planning ``step`` changed, to undo it."""

    step: int
    pass_index: int
    classes: np.ndarray
    cursor_before: np.ndarray
    bad_left_before: np.ndarray
    removed: list[tuple[int, int]]  # (position in active, class), in removal order
    ended: _PassState | None  # the pass this plan ended, as it was
    ended_unused: int


@dataclass
class _ReplaceUndo:
    """What one ``replace`` changed, to undo it or to defer it."""

    step: int  # the plan the bad sample belonged to
    after_step: int  # the last planned step when it happened
    pass_index: int  # the pass it drew from
    cls: int
    cursor_before: int
    bad_left_before: int
    removed: tuple[int, int] | None
    bad_id: int
    bad_added: bool
    bad_from: int
    drawn: int  # -1: none left
    touched: bool  # the pass's cursors changed (False: a replayed one whose pass is gone)
    unused_taken: bool  # it drew from a pass that had ended, so that pass's unused count fell


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wraps; call under errstate(over='ignore'))."""
    z = (z ^ (z >> _U64(30))) * _M1
    z = (z ^ (z >> _U64(27))) * _M2
    return z ^ (z >> _U64(31))


def _feistel(x: np.ndarray, left: np.ndarray, right: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One pass of the unbalanced Feistel network on ``left + right`` bits per element."""
    high = x >> right
    low = x & ((_ONE << right) - _ONE)
    for r in range(_FEISTEL_ROUNDS):
        f = _mix(low ^ (keys + _U64(r + 1) * _GOLDEN)) & ((_ONE << left) - _ONE)
        high, low, left, right = low, high ^ f, right, left
    return (high << right) | low


def _permute(pos: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``perm_key(pos)`` for a bijection ``perm_key`` of ``[0, n)`` per element; needs ``pos < n``.

    Elements with ``n <= 32`` are ranked among the hashes of their class's positions; the
    others go through :func:`_feistel` with cycle-walking (the domain is < 2n, so under two
    walks on average)."""
    out = np.empty(pos.size, dtype=np.int64)
    with np.errstate(over="ignore"):
        small = n <= _SMALL
        if small.any():
            i = np.flatnonzero(small)
            width = int(n[i].max())
            cols = np.arange(width, dtype=np.uint64)
            h = _mix(keys[i, None] ^ (cols[None, :] * _GOLDEN))
            h[cols[None, :] >= n[i, None].astype(np.uint64)] = _U64(2**64 - 1)
            order = np.argsort(h, axis=1, kind="stable")
            out[i] = order[np.arange(i.size), pos[i]]
        if not small.all():
            i = np.flatnonzero(~small)
            m = n[i].astype(np.uint64)
            bits = np.ceil(np.log2(n[i])).astype(np.uint64)  # exact: n is an integer > 32
            left = bits >> _ONE
            right = bits - left
            k = keys[i]
            x = _feistel(pos[i].astype(np.uint64), left, right, k)
            walk = np.flatnonzero(x >= m)
            while walk.size:
                x[walk] = _feistel(x[walk], left[walk], right[walk], k[walk])
                walk = walk[x[walk] >= m[walk]]
            out[i] = x.astype(np.int64)
    return out


class BatchPlanner:
    """Plans every step's global batch of N classes x M samples, cut into W rank slices.

    See the module docstring for the design. Not thread-safe: one owner (the actor) calls it.
    """

    def __init__(
        self,
        class_ids: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        *,
        classes_per_batch: int,
        images_per_class: int,
        world_size: int,
        seed: int,
        sampling: Literal["uniform", "proportional"] = "uniform",
        max_lead: int = 8,
        selector: Selector | None = None,
        rewind_window: int = 1024,
    ) -> None:
        """Start at step 0 of pass 0.

        ``class_ids[i]``, ``starts[i]``, ``counts[i]``: label and sample id range of class i
        (ranges must not overlap). ``classes_per_batch``: N, global; ``images_per_class``:
        M; ``world_size``: W, which must divide N. ``sampling`` picks the built-in selector
        (:func:`select_uniform` or :func:`select_proportional`, the latter drawn by the
        planner's faster equivalent); ``selector``, when given, replaces it. ``max_lead``:
        how many steps past the slowest rank's next untaken step may be planned.
        ``rewind_window``: how many steps behind the slowest rank ``state_dict`` can still
        rewind to (each costs ~N * 16 bytes of undo record).

        Raises ValueError naming the argument: arrays not 1-D integer of one length, ranges
        overlapping or negative, duplicate labels, N < 1, W < 1, N % W != 0, M < 1,
        max_lead < 0, rewind_window < 0, an unknown ``sampling``, a selector that is not
        callable, or fewer than N classes with at least M samples.
        """
        self._class_ids = self._int_array("class_ids", class_ids)
        self._starts = self._int_array("starts", starts)
        self._counts = self._int_array("counts", counts)
        num = self._class_ids.size
        if num == 0 or self._starts.size != num or self._counts.size != num:
            raise ValueError(
                f"class_ids, starts and counts must be non-empty and of one length, got "
                f"{self._class_ids.size}, {self._starts.size}, {self._counts.size}"
            )
        if (self._starts < 0).any() or (self._counts < 0).any():
            raise ValueError("starts and counts must be >= 0")
        if self._counts.max() >= 2**31:
            raise ValueError("counts: a class of 2**31 samples or more is not supported")
        order = np.argsort(self._starts, kind="stable")
        ends = self._starts[order] + self._counts[order]
        clash = np.flatnonzero(ends[:-1] > self._starts[order][1:])
        if clash.size:
            a, b = order[clash[0]], order[clash[0] + 1]
            raise ValueError(f"starts/counts: the sample ranges of classes {a} and {b} overlap")
        if np.unique(self._class_ids).size != num:
            raise ValueError("class_ids: labels must be distinct")
        for name, value, low in (
            ("classes_per_batch", classes_per_batch, 1), ("images_per_class", images_per_class, 1),
            ("world_size", world_size, 1), ("max_lead", max_lead, 0), ("rewind_window", rewind_window, 0),
        ):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if classes_per_batch % world_size:
            raise ValueError(
                f"classes_per_batch ({classes_per_batch}) must be a multiple of world_size ({world_size})"
            )
        if selector is None:
            builtin = {"uniform": select_uniform, "proportional": select_proportional}
            if sampling not in builtin:
                raise ValueError(f"sampling must be 'uniform' or 'proportional', got {sampling!r}")
            selector = builtin[sampling]
        elif not callable(selector):
            raise ValueError(f"selector must be callable, got {type(selector).__name__}")
        eligible = int((self._counts >= images_per_class).sum())
        if eligible < classes_per_batch:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} needs that many classes with >= "
                f"images_per_class={images_per_class} samples; counts has {eligible}"
            )
        self.classes_per_batch = int(classes_per_batch)
        self.images_per_class = int(images_per_class)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.max_lead = int(max_lead)
        self.rewind_window = int(rewind_window)
        self.selector: Selector = selector
        self._bad: dict[int, tuple[int, int]] = {}  # bad id -> (class, first pass that skips it)
        self._unused: list[int] = []
        self._pass = self._fresh_pass(0)
        self._start_log(0)

    # ---- public API -------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return int(self._counts.size)

    @property
    def next_step(self) -> int:
        """The first step not planned yet."""
        return self._next_step

    @property
    def pass_index(self) -> int:
        """The pass the latest planned step is in (the pass ``next_step`` starts in, unless it ends it)."""
        return self._pass.index

    @property
    def unused(self) -> list[int]:
        """Good samples each finished pass left unused (index = pass), for ``data/unused``."""
        return list(self._unused)

    @property
    def bad_ids(self) -> np.ndarray:
        """Sorted int64 array of the sample ids reported bad so far."""
        return np.array(sorted(self._bad), dtype=np.int64)

    def slowest(self) -> int:
        """The slowest rank's next untaken step."""
        return self._slowest

    def can_plan(self, step: int) -> bool:
        """Whether ``plan(step)`` would return now: the step is planned and kept, or at most
        ``max_lead`` ahead of the slowest rank. Raises nothing."""
        if step < self._next_step:
            return step in self._plans
        return step <= self.slowest() + self.max_lead

    def plan(self, step: int) -> StepPlan:
        """The plan of ``step``, planning it (and any unplanned step before it) if needed.

        Returns the same :class:`StepPlan` object to every ask until every rank has taken it.
        Raises :class:`PlanAhead` when ``step`` is more than ``max_lead`` past the slowest
        rank; ValueError when it was already dropped (every rank took it) or is below the
        step the planner started at; RuntimeError when a new pass has fewer than N active
        classes (too many bad samples); ValueError when the selector's answer is not N
        distinct active classes.
        """
        if step < self._next_step:
            if step not in self._plans:
                raise ValueError(
                    f"step {step} is no longer held: every rank has taken it (held: "
                    f"{min(self._plans, default=self._next_step)}..{self._next_step - 1})"
                )
            return self._plans[step]
        if step > self.slowest() + self.max_lead:
            raise PlanAhead(step, self.slowest(), self.max_lead)
        while self._next_step <= step:
            self._plan_next()
        return self._plans[step]

    def slice(self, step: int, rank: int) -> RankSlice:
        """``plan(step).slice(rank)``; raises what those raise."""
        return self.plan(step).slice(rank)

    def take(self, step: int, rank: int) -> None:
        """Mark ``step`` as taken by ``rank`` (call after the slice's last ``replace``).

        Once every rank has taken a step its plan is dropped, and undo records older than
        ``rewind_window`` steps behind the slowest rank go. Taking a step twice is a no-op.
        Raises ValueError for a rank outside ``[0, W)`` or a step not planned yet."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        if step >= self._next_step:
            raise ValueError(f"step {step} is not planned yet (next step to plan: {self._next_step})")
        if step < self._untaken[rank]:
            return
        ahead = self._taken_ahead[rank]
        ahead.add(step)
        while self._untaken[rank] in ahead:
            ahead.discard(int(self._untaken[rank]))
            self._untaken[rank] += 1
        before, slowest = self._slowest, int(self._untaken.min())
        if slowest == before:
            return
        self._slowest = slowest
        for s in range(before, slowest):
            self._plans.pop(s, None)
        floor = slowest - self.rewind_window
        log = self._log
        popped = False
        while log and (isinstance(log[0], _ReplaceUndo) or log[0].step < floor):
            log.popleft()
            popped = True
        if popped:
            # events are in time order and a replacement is logged after its plan, so the
            # oldest pass any kept record needs is the first one's (or the pass it ended)
            front = log[0] if log else None
            oldest = self._pass.index if front is None else (
                front.ended.index if front.ended is not None else front.pass_index
            )
            for index in [i for i in self._passes if i < oldest]:
                del self._passes[index]

    def replace(self, step: int, rank: int, sample_id: int) -> int | None:
        """Another unused sample of ``sample_id``'s class for a sample of ``rank``'s slice of
        ``step`` that turned out bad; returns its id, or None when the class has none left
        in the plan's pass.

        The plan's ``sample_ids`` get the new id; asking again for the same bad id returns
        the same answer. The bad id is skipped by every pass that starts after this call.
        Raises ValueError when the step is not held or the id is not in that rank's slice.
        """
        plan = self._plans.get(step)
        if plan is None:
            raise ValueError(f"step {step} is not held (planned and not yet taken by every rank)")
        if sample_id in plan.replaced:
            return plan.replaced[sample_id]
        width = plan.sample_ids.size // self.world_size
        part = plan.sample_ids[rank * width : (rank + 1) * width] if 0 <= rank < self.world_size else None
        hit = np.flatnonzero(part == sample_id) if part is not None else np.zeros(0)
        if hit.size == 0:
            raise ValueError(f"sample {sample_id} is not in rank {rank}'s slice of step {step}")
        where = rank * width + int(hit[0])
        cls = int(plan.classes[where // self.images_per_class])
        tag = self._bad[sample_id][1] if sample_id in self._bad else self._pass.index + 1
        drawn = self._apply_replace(step, plan.pass_index, cls, int(sample_id), tag)
        plan.replaced[sample_id] = drawn
        if drawn is not None:
            plan.sample_ids[where] = drawn
        return drawn

    def state_dict(self, step: int) -> dict[str, int | np.ndarray]:
        """The planner's position as of ``step``: as if steps >= ``step`` had never been planned.

        Replacements made for steps < ``step`` after ``step`` was planned are kept as
        deferred (see the module docstring); those made for steps >= ``step`` are dropped,
        as the restored run fetches those samples again and replaces them again. Returns a
        flat dict of Python ints and integer NumPy arrays (see the module docstring for its
        size and how to checkpoint it). Raises ValueError when ``step`` is past
        ``next_step`` or older than the undo records kept (``rewind_window``).
        """
        if step > self._next_step:
            raise ValueError(f"step {step} is not planned yet (next step to plan: {self._next_step})")
        plan_steps = [e.step for e in self._log if isinstance(e, _PlanUndo)]
        first = plan_steps[0] if plan_steps else self._next_step
        if step < first:
            raise ValueError(
                f"step {step} is older than the oldest step that can be rewound to ({first}); "
                f"raise rewind_window (now {self.rewind_window})"
            )
        copies: dict[int, _PassState] = {}

        def pass_state(index: int) -> _PassState:
            if index not in copies:
                copies[index] = self._passes[index].copy()
            return copies[index]

        current = pass_state(self._pass.index)
        bad = dict(self._bad)
        unused = list(self._unused)
        deferred: list[_ReplaceUndo] = []
        for event in reversed(self._log):
            if isinstance(event, _PlanUndo):
                if event.step < step:
                    break  # step == next_step: nothing to undo
                p = pass_state(event.pass_index)
                for pos, cls in reversed(event.removed):
                    self._undo_remove(p, pos, cls)
                p.cursor[event.classes] = event.cursor_before
                p.bad_left[event.classes] = event.bad_left_before
                p.remaining[event.classes] = (
                    self._counts[event.classes] - event.cursor_before - event.bad_left_before
                )
                if event.ended is not None:
                    unused.pop()
                    current = pass_state(event.ended.index)
                if event.step == step:
                    break  # what was logged before planning `step` stays
            else:
                if event.step < step:
                    deferred.append(event)
                if event.touched:
                    p = pass_state(event.pass_index)
                    if event.removed is not None:
                        self._undo_remove(p, *event.removed)
                    p.cursor[event.cls] = event.cursor_before
                    p.bad_left[event.cls] = event.bad_left_before
                    p.remaining[event.cls] = self._counts[event.cls] - event.cursor_before - event.bad_left_before
                if event.bad_added:
                    del bad[event.bad_id]
                if event.unused_taken:
                    unused[event.pass_index] += 1
        rows = [
            (e.after_step, e.step, e.pass_index, e.cls, e.bad_id, e.bad_from, e.drawn)
            for e in reversed(deferred)
        ]
        rows += [tuple(int(v) for v in r) for r in self._pending]
        ids = np.array(sorted(bad), dtype=np.int64)
        nonzero = np.flatnonzero(current.bad_left)
        return {
            "version": STATE_VERSION,
            "step": int(step),
            "seed": self.seed,
            "num_classes": self.num_classes,
            "total_samples": int(self._counts.sum()),
            "classes_per_batch": self.classes_per_batch,
            "images_per_class": self.images_per_class,
            "pass_index": current.index,
            "cursor": current.cursor.copy(),
            "active": current.active[: current.n_active].copy(),
            "bad_left_classes": nonzero.astype(np.int64),
            "bad_left_counts": current.bad_left[nonzero].astype(np.int64),
            "bad_ids": ids,
            "bad_classes": np.array([bad[i][0] for i in ids], dtype=np.int64),
            "bad_from_pass": np.array([bad[i][1] for i in ids], dtype=np.int64),
            "unused": np.array(unused, dtype=np.int64),
            "deferred": np.array(rows, dtype=np.int64).reshape(-1, 7),
        }

    def load_state_dict(self, state: dict[str, int | np.ndarray]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`): ``next_step`` becomes its step,
        no plan is held, every rank's next step is that step.

        Raises ValueError when the state is of another version, seed, N, M or manifest
        (number of classes, total samples) or its arrays do not fit."""
        for key, mine in (
            ("version", STATE_VERSION), ("seed", self.seed), ("num_classes", self.num_classes),
            ("total_samples", int(self._counts.sum())), ("classes_per_batch", self.classes_per_batch),
            ("images_per_class", self.images_per_class),
        ):
            if int(state[key]) != mine:
                raise ValueError(f"planner state: {key} is {int(state[key])}, this planner has {mine}")
        cursor = np.asarray(state["cursor"], dtype=np.int32)
        active = np.asarray(state["active"], dtype=np.int32)
        if cursor.shape != (self.num_classes,) or (cursor > self._counts).any() or (cursor < 0).any():
            raise ValueError("planner state: cursor does not fit this manifest")
        num = self.num_classes
        if active.size and (active.min() < 0 or active.max() >= num or np.unique(active).size != active.size):
            raise ValueError("planner state: active is not a set of class indices")
        ids = np.asarray(state["bad_ids"], dtype=np.int64)
        self._bad = {
            int(i): (int(c), int(f))
            for i, c, f in zip(ids, np.asarray(state["bad_classes"]), np.asarray(state["bad_from_pass"]))
        }
        self._unused = [int(u) for u in np.asarray(state["unused"])]
        index = int(state["pass_index"])
        bad_left = np.zeros(num, dtype=np.int32)
        bad_left[np.asarray(state["bad_left_classes"], dtype=np.int64)] = np.asarray(state["bad_left_counts"])
        where = np.full(num, -1, dtype=np.int32)
        where[active] = np.arange(active.size, dtype=np.int32)
        full = np.empty(num, dtype=np.int32)
        full[: active.size] = active
        full[active.size :] = np.flatnonzero(where < 0)
        remaining = (self._counts - cursor - bad_left).astype(np.int32)
        if (remaining[active] < self.images_per_class).any():
            raise ValueError("planner state: an active class has fewer than images_per_class samples left")
        skip = frozenset(i for i, (_, f) in self._bad.items() if f <= index)
        self._pass = self._pass_state(index, cursor.copy(), bad_left, remaining, full, where, int(active.size), skip)
        self._start_log(int(state["step"]))
        deferred = np.asarray(state["deferred"], dtype=np.int64).reshape(-1, 7)
        if deferred.size and deferred[:, 0].min() < self._next_step:
            raise ValueError("planner state: a deferred replacement is older than its step")
        self._pending = deque(deferred)

    @classmethod
    def from_state(
        cls,
        class_ids: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        state: dict[str, int | np.ndarray],
        **kwargs,
    ) -> BatchPlanner:
        """A planner built with the constructor's arguments (``kwargs``) that continues from
        ``state``; raises what the constructor and :meth:`load_state_dict` raise."""
        planner = cls(class_ids, starts, counts, **kwargs)
        planner.load_state_dict(state)
        return planner

    def rewind(self, step: int) -> None:
        """Go back to ``step`` in place (e.g. the trainers restarted from a checkpoint while
        this planner lived on); raises what :meth:`state_dict` raises."""
        self.load_state_dict(self.state_dict(step))

    # ---- internals ----------------------------------------------------------------------

    @staticmethod
    def _int_array(name: str, values: np.ndarray) -> np.ndarray:
        arr = np.asarray(values)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        return arr.astype(np.int64)

    def _start_log(self, step: int) -> None:
        self._next_step = step
        self._plans: dict[int, StepPlan] = {}
        self._untaken = np.full(self.world_size, step, dtype=np.int64)
        self._slowest = step
        self._taken_ahead: list[set[int]] = [set() for _ in range(self.world_size)]
        self._log: deque[_PlanUndo | _ReplaceUndo] = deque()
        self._passes: dict[int, _PassState] = {self._pass.index: self._pass}
        self._pending: deque[np.ndarray] = deque()

    def _fresh_pass(self, index: int) -> _PassState:
        num = self.num_classes
        skip = frozenset(i for i, (_, f) in self._bad.items() if f <= index)
        bad_left = np.zeros(num, dtype=np.int32)
        if skip:
            np.add.at(bad_left, np.array([self._bad[i][0] for i in skip], dtype=np.int64), 1)
        remaining = (self._counts - bad_left).astype(np.int32)
        is_active = remaining >= self.images_per_class
        active = np.concatenate([np.flatnonzero(is_active), np.flatnonzero(~is_active)]).astype(np.int32)
        n_active = int(is_active.sum())
        where = np.full(num, -1, dtype=np.int32)
        where[active[:n_active]] = np.arange(n_active, dtype=np.int32)
        return self._pass_state(index, np.zeros(num, np.int32), bad_left, remaining, active, where, n_active, skip)

    def _pass_state(self, index, cursor, bad_left, remaining, active, where, n_active, skip) -> _PassState:
        by_remaining = np.bincount(remaining[active[:n_active]], minlength=int(self._counts.max()) + 1)
        top = int(np.flatnonzero(by_remaining)[-1]) if n_active else 0
        return _PassState(index, cursor, bad_left, remaining, active, where, n_active, skip, by_remaining, top)

    def _keys(self, pass_index: int, classes: np.ndarray) -> np.ndarray:
        """The permutation key of each class in pass ``pass_index`` (a hash of seed, pass, class)."""
        with np.errstate(over="ignore"):
            base = _mix(np.array([self.seed & (2**64 - 1)], dtype=np.uint64) ^ _mix(
                np.array([pass_index], dtype=np.uint64) * _GOLDEN + _U64(1)))
            return _mix(base ^ (classes.astype(np.uint64) * _M2 + _GOLDEN))

    def _draw(self, p: _PassState, classes: np.ndarray, k: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Take the next ``k`` good positions of each class of ``classes`` (distinct, each with
        >= k remaining) in pass ``p``; returns their sample ids (len(classes), k) and the
        classes deactivated, as (position in active, class) in removal order."""
        cur = p.cursor[classes].astype(np.int64)
        n = self._counts[classes]
        pos = (cur[:, None] + np.arange(k)).ravel()
        rows = np.repeat(np.arange(classes.size), k)
        keys = self._keys(p.index, classes)
        ids = (self._starts[classes][rows] + _permute(pos, n[rows], keys[rows])).reshape(-1, k)
        new_cursor = cur + k
        for r in np.flatnonzero(p.bad_left[classes] > 0):
            # rare: a class with known-bad ids ahead walks one position at a time
            c, q, got = int(classes[r]), int(cur[r]), []
            while len(got) < k:
                sid = int(self._starts[c] + _permute(np.array([q]), n[r : r + 1], keys[r : r + 1])[0])
                q += 1
                if sid in p.skip:
                    p.bad_left[c] -= 1
                else:
                    got.append(sid)
            ids[r] = got
            new_cursor[r] = q
        was_active = p.where[classes] >= 0
        np.subtract.at(p.by_remaining, p.remaining[classes[was_active]], 1)
        p.cursor[classes] = new_cursor
        p.remaining[classes] = n - new_cursor - p.bad_left[classes]
        still = classes[was_active & (p.remaining[classes] >= self.images_per_class)]
        np.add.at(p.by_remaining, p.remaining[still], 1)
        while p.top > 0 and p.by_remaining[p.top] == 0:
            p.top -= 1
        removed = []
        for c in classes[(p.remaining[classes] < self.images_per_class) & (p.where[classes] >= 0)]:
            removed.append(self._remove(p, int(c)))
        return ids, removed

    @staticmethod
    def _remove(p: _PassState, c: int) -> tuple[int, int]:
        pos = int(p.where[c])
        last = int(p.active[p.n_active - 1])
        p.active[pos] = last
        p.where[last] = pos
        p.where[c] = -1
        p.n_active -= 1
        return pos, c

    @staticmethod
    def _undo_remove(p: _PassState, pos: int, c: int) -> None:
        # the class swapped into pos is still also at n_active (nothing wrote past n_active since)
        moved = int(p.active[pos])
        p.where[moved] = p.n_active
        p.active[pos] = c
        p.where[c] = pos
        p.n_active += 1

    def _plan_next(self) -> None:
        step = self._next_step
        n, m = self.classes_per_batch, self.images_per_class
        p = self._pass
        ended, ended_unused = None, 0
        if p.n_active < n:
            ended, ended_unused = p, int(p.remaining.sum(dtype=np.int64))
            p = self._fresh_pass(p.index + 1)
            if p.n_active < n:
                raise RuntimeError(
                    f"pass {p.index} has {p.n_active} classes with >= {m} good samples, fewer than "
                    f"classes_per_batch={n}: too many samples were reported bad ({len(self._bad)})"
                )
            self._unused.append(ended_unused)
            self._pass = p
            self._passes[p.index] = p
        rng = np.random.default_rng((self.seed & (2**63 - 1), step))
        if self.selector is select_proportional:
            classes = self._select_proportional(p, n, rng)
        else:
            classes = np.asarray(self.selector(p.active[: p.n_active], n, rng, p.remaining), dtype=np.int64)
        if (
            classes.shape != (n,)
            or classes.min() < 0
            or classes.max() >= self.num_classes
            or (p.where[classes] < 0).any()
            or (np.diff(np.sort(classes)) == 0).any()
        ):
            raise ValueError(f"selector returned {classes!r}, not {n} distinct active class indices")
        cursor_before = p.cursor[classes].copy()
        bad_left_before = p.bad_left[classes].copy()
        ids, removed = self._draw(p, classes, m)
        plan = StepPlan(
            step=step,
            pass_index=p.index,
            classes=classes,
            sample_ids=ids.ravel(),
            labels=np.repeat(self._class_ids[classes], m),
            world_size=self.world_size,
            images_per_class=m,
        )
        self._log.append(
            _PlanUndo(step, p.index, classes, cursor_before, bad_left_before, removed, ended, ended_unused)
        )
        self._plans[step] = plan
        self._next_step = step + 1
        while self._pending and self._pending[0][0] == step:
            _after, old_step, pass_index, cls, bad_id, bad_from, drawn = (int(v) for v in self._pending.popleft())
            held = pass_index in self._passes
            got = self._apply_replace(old_step, pass_index, cls, bad_id, bad_from, replayed=drawn)
            if held and (got if got is not None else -1) != drawn:
                raise RuntimeError(
                    f"restored planner state does not match this manifest: a deferred replacement "
                    f"of step {old_step} drew {got}, the saved run drew {drawn}"
                )

    def _select_proportional(self, p: _PassState, n: int, rng: np.random.Generator) -> np.ndarray:
        """:func:`select_proportional`'s distribution without its O(active) cost.

        Rejection: a uniform active class c is kept with probability remaining[c] / top
        (``top`` = the largest remaining count, kept by a histogram), so kept draws are
        i.i.d. proportional to remaining; the first n distinct ones are successive sampling
        without replacement, as ``Generator.choice(p=..., replace=False)`` draws. Its cost
        is n * top / mean(remaining) draws (~17 per class on CASIA-like sizes); when a fixed
        budget of draws runs out (rng-dependent, so still a function of the state), the
        rest comes from the exact O(active) draw over the classes not chosen yet, which
        continues the same process, so the result stays exact."""
        active = p.active[: p.n_active]
        chosen = np.zeros(0, dtype=np.int64)
        for _ in range(16):
            draw = active[rng.integers(0, active.size, 2048)].astype(np.int64)
            kept = draw[rng.random(2048) * p.top < p.remaining[draw]]
            _, first = np.unique(kept, return_index=True)
            kept = kept[np.sort(first)]
            kept = kept[~np.isin(kept, chosen)]
            chosen = np.concatenate([chosen, kept[: n - chosen.size]])
            if chosen.size == n:
                return chosen
        rest = active[~np.isin(active, chosen)]
        weights = p.remaining[rest].astype(np.float64)
        more = rng.choice(rest, size=n - chosen.size, replace=False, p=weights / weights.sum())
        return np.concatenate([chosen, more.astype(np.int64)])

    def _apply_replace(
        self, step: int, pass_index: int, cls: int, bad_id: int, bad_from: int, replayed: int | None = None
    ) -> int | None:
        """Draw one replacement from class ``cls`` in pass ``pass_index``, remember ``bad_id``
        and log both; returns the id, or None when the class has none left. ``replayed``: the
        id a deferred replacement drew in the saved run; when its pass ended before the
        restored step (so is not held here) only the bad id and that pass's unused count
        change, as they did in the saved run."""
        p = self._passes.get(pass_index)
        added = bad_id not in self._bad
        if added:
            self._bad[bad_id] = (cls, bad_from)
        cursor_before = int(p.cursor[cls]) if p is not None else 0
        bad_left_before = int(p.bad_left[cls]) if p is not None else 0
        drawn, removed = -1, None
        if p is None:
            drawn = -1 if replayed is None else replayed
        elif p.remaining[cls] >= 1:
            ids, rem = self._draw(p, np.array([cls], dtype=np.int64), 1)
            drawn, removed = int(ids[0, 0]), (rem[0] if rem else None)
        unused_taken = drawn >= 0 and pass_index < len(self._unused)
        if unused_taken:
            self._unused[pass_index] -= 1
        self._log.append(
            _ReplaceUndo(step, self._next_step - 1, pass_index, cls, cursor_before, bad_left_before,
                         removed, bad_id, added, bad_from, drawn, p is not None, unused_taken)
        )
        return drawn if drawn >= 0 and p is not None else None
