"""BatchPlanner against obviously-correct references: per-step invariants, whole passes,
uniform-sampling statistics on a CASIA-WebFace-shaped manifest, exact rewind/restore."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest

from pipeline.data.planner import (
    BatchPlanner,
    PlanAhead,
    _permute,
    select_proportional,
    select_uniform,
)


def manifest(num_classes: int, low: int, high: int, seed: int = 0, gap: int = 3):
    """Labels, starts, counts of ``num_classes`` classes of ``low..high`` samples, the id
    ranges in a shuffled order with gaps between them (ids need not be dense)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(low, high + 1, num_classes)
    order = rng.permutation(num_classes)
    starts = np.zeros(num_classes, dtype=np.int64)
    starts[order] = np.concatenate([[0], np.cumsum(counts[order] + gap)[:-1]])
    return 100 + 7 * np.arange(num_classes), starts, counts


def casia_like():
    """10,575 classes of 2..800 samples, a seeded lognormal (mean ~47, like CASIA-WebFace)."""
    rng = np.random.default_rng(42)
    counts = np.clip(np.round(rng.lognormal(3.36, 1.0, 10_575)), 2, 800).astype(np.int64)
    return np.arange(10_575), np.concatenate([[0], np.cumsum(counts)[:-1]]), counts


@functools.cache
def casia_pass(sampling: str) -> tuple[list[np.ndarray], int]:
    """The classes of every step of pass 0 on :func:`casia_like` with N = 192, M = 2, W = 8,
    and the samples the pass left unused (computed once per mode for the tests below)."""
    p = BatchPlanner(*casia_like(), classes_per_batch=192, images_per_class=2, world_size=8, seed=1,
                     sampling=sampling, max_lead=10**6)
    return [plan.classes for plan in run_pass(p, 0)], p.unused[0]


def planner(m, **kw):
    args = {"classes_per_batch": 6, "images_per_class": 2, "world_size": 3, "seed": 5, "max_lead": 10**6}
    args.update(kw)
    return BatchPlanner(*m, **args)


def take_all(p: BatchPlanner, step: int) -> None:
    for r in range(p.world_size):
        p.take(step, r)


def run_pass(p: BatchPlanner, pass_index: int) -> list:
    """Plans of pass ``pass_index`` (the planner is left at the first step of the next pass)."""
    plans = []
    step = p.next_step
    if step and p.can_plan(step - 1) and p.plan(step - 1).pass_index == pass_index:
        step -= 1  # the previous call stopped on this pass's first plan
    while True:
        plan = p.plan(step)
        if plan.pass_index != pass_index:
            return plans
        plans.append(plan)
        if step:
            take_all(p, step - 1)  # keep the latest plan held
        step += 1


def test_permutation_is_a_bijection_for_every_size():
    for n in list(range(1, 80)) + [127, 128, 129, 800, 1000, 4097]:
        keys = np.full(n, 0xDEADBEEF, dtype=np.uint64)
        got = _permute(np.arange(n), np.full(n, n), keys)
        assert sorted(got.tolist()) == list(range(n)), n
    # another key, another order
    n = 500
    a = _permute(np.arange(n), np.full(n, n), np.full(n, 1, dtype=np.uint64))
    b = _permute(np.arange(n), np.full(n, n), np.full(n, 2, dtype=np.uint64))
    assert (a != b).mean() > 0.9


def test_every_plan_is_n_distinct_classes_of_m_own_samples_cut_in_disjoint_slices():
    ids, starts, counts = manifest(40, 1, 15)
    p = planner((ids, starts, counts), classes_per_batch=8, images_per_class=3, world_size=4)
    for step in range(60):
        plan = p.plan(step)
        assert p.plan(step) is plan
        assert plan.classes.size == 8 and np.unique(plan.classes).size == 8
        assert plan.sample_ids.size == 24
        for j, c in enumerate(plan.classes):
            got = plan.sample_ids[3 * j : 3 * j + 3]
            assert ((got >= starts[c]) & (got < starts[c] + counts[c])).all()
            assert np.unique(got).size == 3
            assert (plan.labels[3 * j : 3 * j + 3] == ids[c]).all()
        slices = [plan.slice(r) for r in range(4)]
        assert all(s.sample_ids.size == 6 and s.step == step for s in slices)
        np.testing.assert_array_equal(np.concatenate([s.sample_ids for s in slices]), plan.sample_ids)
        np.testing.assert_array_equal(np.concatenate([s.labels for s in slices]), plan.labels)
        assert np.unique(np.concatenate([s.sample_ids for s in slices])).size == 24
        np.testing.assert_array_equal(p.slice(step, 2).sample_ids, slices[2].sample_ids)
        take_all(p, step)
    with pytest.raises(ValueError, match="rank"):
        p.plan(60).slice(4)
    with pytest.raises(ValueError, match="no longer held"):
        p.plan(3)


def test_a_pass_uses_every_good_sample_once_up_to_the_counted_unused():
    ids, starts, counts = manifest(50, 1, 25, seed=3)
    n, m = 6, 2
    p = planner((ids, starts, counts), classes_per_batch=n, images_per_class=m)
    total = int(counts.sum())
    previous = None
    for pass_index in range(3):
        plans = run_pass(p, pass_index)
        used = np.concatenate([pl.sample_ids for pl in plans])
        assert np.unique(used).size == used.size  # at most once
        assert used.size + p.unused[pass_index] == total  # exactly once, up to the leftovers
        cls = np.searchsorted(np.sort(starts), used, side="right") - 1
        per_class = np.bincount(np.argsort(starts)[cls], minlength=50)
        left = counts - per_class
        assert (left[counts < m] == counts[counts < m]).all()  # never drawn
        assert ((left >= m).sum()) < n  # the pass ended because fewer than N classes were active
        if previous is not None:  # a new pass is a new order: positions of the same samples differ
            assert not np.array_equal(previous[:50], used[:50])
        previous = used


def test_uniform_mode_on_a_casia_like_manifest_shares_classes_at_the_uniform_rate_and_draws_every_class():
    counts = casia_like()[2]
    assert 45 < counts.mean() < 50 and counts.min() == 2 and counts.max() == 800
    n, m = 192, 2
    steps, unused = casia_pass("uniform")
    left = counts.copy()  # the reference: samples left per class, from the plans alone
    prev = None
    observed = expected = variance = 0.0
    early = []
    drawn = np.zeros(counts.size, dtype=bool)
    for step, classes in enumerate(steps):
        active = left >= m
        a = int(active.sum())
        if prev is not None:
            # uniform draws N of the A active classes; the k classes of the previous batch
            # that are still active are hit hypergeometrically: mean N*k/A, variance below it
            k = int(active[prev].sum())
            mean = n * k / a
            overlap = np.intersect1d(prev, classes).size
            observed += overlap
            expected += mean
            variance += mean * (1 - k / a) * (a - n) / (a - 1)
            if step <= 200:
                early.append(overlap)
        assert active[classes].all()
        left[classes] -= m
        drawn[classes] = True
        prev = classes
    assert (left >= m).sum() < n  # the pass ended when it had to
    # at the start A ~ 10.5k: N*N/A = 3.49 shared classes per step; over 200 steps the mean's sd is ~0.13
    assert abs(np.mean(early) - n * n / counts.size) < 0.6
    # over the whole pass (~1,000 steps, ~4,000 expected): within 4 standard deviations
    assert abs(observed - expected) < 4 * np.sqrt(variance), (observed, expected, np.sqrt(variance))
    assert drawn[counts >= m].all()
    assert unused == int(left.sum())


def test_proportional_mode_runs_classes_out_together():
    counts = casia_like()[2]
    unused = {mode: casia_pass(mode)[1] for mode in ("uniform", "proportional")}
    # no mode can use a class's last counts % M samples; beyond that floor uniform leaves
    # the big classes' tails (~5% of the samples), proportional only crumbs
    floor = int((counts % 2).sum())
    assert unused["uniform"] - floor > 0.03 * counts.sum()
    assert 0 <= unused["proportional"] - floor < 0.02 * (unused["uniform"] - floor), (unused, floor)


def test_a_custom_selector_is_used_and_checked():
    m = manifest(20, 2, 6)

    def lowest(active, n, rng, remaining):
        return np.sort(active)[:n]

    p = planner(m, selector=lowest)
    np.testing.assert_array_equal(p.plan(0).classes, np.arange(6))
    bad = planner(m, selector=lambda active, n, rng, remaining: active[:1].repeat(n))
    with pytest.raises(ValueError, match="selector returned"):
        bad.plan(0)


def test_max_lead_refuses_steps_too_far_ahead_of_the_slowest_rank():
    p = planner(manifest(30, 4, 10), world_size=2, classes_per_batch=4, max_lead=3)
    for step in range(4):
        assert p.can_plan(step)
        p.plan(step)
    assert not p.can_plan(4)
    with pytest.raises(PlanAhead) as err:
        p.plan(4)
    assert (err.value.step, err.value.slowest, err.value.max_lead) == (4, 0, 3)
    p.take(0, 0)
    p.take(1, 0)
    assert not p.can_plan(4)  # rank 1 has not taken step 0
    p.take(0, 1)
    assert p.can_plan(4) and not p.can_plan(5)
    assert p.plan(4).step == 4
    assert not p.can_plan(0)
    with pytest.raises(ValueError, match="no longer held"):
        p.plan(0)
    p.take(3, 1)  # out of order: rank 1 is still at step 1
    assert p.slowest() == 1


def test_replace_gives_an_unused_sample_of_the_same_class_and_later_passes_skip_the_bad_one():
    ids, starts, counts = manifest(12, 2, 9, seed=1)
    counts[0] = 2  # class 0: exactly M samples, nothing to replace with once drawn
    p = planner((ids, starts, counts), classes_per_batch=4, world_size=2, sampling="proportional")
    plan = p.plan(0)
    bad = int(plan.slice(1).sample_ids[0])
    cls = plan.classes[2]
    new = p.replace(0, 1, bad)
    assert new is not None and starts[cls] <= new < starts[cls] + counts[cls] and new != bad
    assert p.replace(0, 1, bad) == new  # idempotent
    assert plan.slice(1).sample_ids[0] == new and plan.replaced == {bad: new}
    with pytest.raises(ValueError, match="not in rank 0"):
        p.replace(0, 0, new)
    # the rest of the pass never hands out the replacement or the bad sample again
    plans = [plan] + run_pass(p, 0)[1:]
    used = np.concatenate([pl.sample_ids for pl in plans])
    assert np.unique(used).size == used.size and bad not in used and new in used
    # a class with nothing left answers None
    p2 = planner((ids, starts, counts), classes_per_batch=4, world_size=2, selector=lambda a, n, r, rem: np.sort(a)[:n])
    zero = int(p2.plan(0).sample_ids[0])
    assert p2.replace(0, 0, zero) is None and p2.plan(0).replaced == {zero: None}
    assert zero in p2.bad_ids
    # passes that start after the report skip the bad ids
    for q in (p, p2):
        b = int(q.bad_ids[0])
        start = q.pass_index
        while q.pass_index < start + 2:
            pl = q.plan(q.next_step)
            assert b not in pl.sample_ids or pl.pass_index == start
            take_all(q, pl.step)
    with pytest.raises(ValueError, match="not held"):
        p.replace(0, 0, bad)


def scripted_run(m, steps: int, lead: int, seed: int, **kw):
    """A run's calls: plan every step, ranks take ``lead`` steps behind, and random held
    samples are replaced (also samples of plans of a pass that has ended). Returns the ops:
    ("plan", step), ("replace", step, rank, slot in the slice), ("take", step)."""
    rng = np.random.default_rng(seed)
    p = planner(m, **kw)
    ops = []
    for step in range(steps):
        ops.append(("plan", step))
        p.plan(step)
        for _ in range(rng.poisson(0.6)):
            s = int(rng.integers(max(0, step - lead), step + 1))
            r = int(rng.integers(p.world_size))
            ops.append(("replace", s, r, int(rng.integers(p.classes_per_batch // p.world_size * p.images_per_class))))
            apply(p, ops[-1])
        if step >= lead:
            ops.append(("take", step - lead))
            take_all(p, step - lead)
    return ops


def apply(p: BatchPlanner, op, plans: dict | None = None) -> None:
    """Do ``op`` on ``p``; keep each new plan in ``plans`` (the objects get the replacements)."""
    if op[0] == "plan":
        plan = p.plan(op[1])
        if plans is not None:
            plans[op[1]] = plan
    elif op[0] == "take":
        take_all(p, op[1])
    else:
        _, s, r, slot = op
        p.replace(s, r, int(p.plan(s).slice(r).sample_ids[slot]))


def run_ops(p: BatchPlanner, ops) -> dict:
    plans = {}
    for op in ops:
        apply(p, op, plans)
    return plans


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(b[k]), err_msg=k)


def test_state_as_of_a_step_equals_the_state_of_a_planner_that_never_planned_ahead():
    m = manifest(30, 2, 10, seed=7)
    ahead = planner(m)
    for step in range(80):
        ahead.plan(step)
        if step >= 9:
            take_all(ahead, step - 9)
        lagging = step - 8  # rewind to a step that has 8 planned steps after it
        if lagging >= 1:
            exact = planner(m)
            for s in range(lagging):
                exact.plan(s)
            assert_states_equal(ahead.state_dict(lagging), exact.state_dict(lagging))
    assert ahead.pass_index >= 4  # the windows straddled several pass boundaries


@pytest.mark.parametrize("sampling", ["uniform", "proportional"])
def test_restore_continues_exactly_with_replacements_in_flight_and_across_passes(sampling):
    m = manifest(30, 2, 10, seed=11)
    steps, lead = 70, 6
    ops = scripted_run(m, steps, lead, seed=3, sampling=sampling)
    full = planner(m, sampling=sampling)
    reference = run_ops(full, ops)  # the uninterrupted run
    assert full.pass_index >= 3 and len(full.bad_ids) > 20
    # every 4th step, and every step around a pass boundary (the plans ahead straddle it)
    starts_of_pass = [s for s in range(1, steps) if reference[s].pass_index != reference[s - 1].pass_index]
    points = set(range(1, steps - lead, 4)) | {b + d for b in starts_of_pass for d in (-lead, -2, -1, 0, 1)}
    deferred = 0
    for restore in sorted(r for r in points if 1 <= r < steps - lead):
        # the checkpoint of step `restore` is taken once step restore+lead is planned (and
        # the replacements right after it are done): ranks and fetches are ahead of it
        moment = ops.index(("plan", restore + lead)) + 1
        while ops[moment][0] == "replace":
            moment += 1
        before = planner(m, sampling=sampling)
        run_ops(before, ops[:moment])
        state = before.state_dict(restore)
        deferred += len(state["deferred"])
        restored = BatchPlanner.from_state(
            *m, state, classes_per_batch=6, images_per_class=2, world_size=3, seed=5,
            max_lead=10**6, sampling=sampling,
        )
        # the restored run redoes what came after planning `restore`, except replacing
        # samples of earlier steps: those were trained before the checkpoint (in the state)
        redo = [op for op in ops[ops.index(("plan", restore)) :] if not (op[0] == "replace" and op[1] < restore)]
        plans = run_ops(restored, redo)
        for s in range(restore, steps):
            np.testing.assert_array_equal(
                plans[s].sample_ids, reference[s].sample_ids, err_msg=f"restored at {restore}, step {s}"
            )
            assert plans[s].pass_index == reference[s].pass_index
        assert restored.unused == full.unused
        np.testing.assert_array_equal(restored.bad_ids, full.bad_ids)
        assert_states_equal(restored.state_dict(steps), full.state_dict(steps))
    assert deferred > 30  # replacements were in flight at most checkpoints


def test_each_pass_draws_each_sample_once_with_replacements():
    m = manifest(30, 2, 10, seed=11)
    ops = scripted_run(m, 70, 6, seed=3)
    p = planner(m)
    plans = run_ops(p, ops)
    total = int(m[2].sum())
    for pass_index in range(p.pass_index):
        mine = [pl for pl in plans.values() if pl.pass_index == pass_index]
        trained = np.concatenate([pl.sample_ids for pl in mine])
        swapped = [b for pl in mine for b, new in pl.replaced.items() if new is not None]
        drawn = np.concatenate([trained, np.array(swapped, dtype=np.int64)])
        assert np.unique(drawn).size == drawn.size, pass_index
        skipped = [b for b in p.bad_ids if b not in drawn]  # bad ids this pass skipped (or never met)
        assert drawn.size + p.unused[pass_index] + len(skipped) >= total
        assert drawn.size + p.unused[pass_index] <= total


def test_state_is_plain_and_round_trips_through_npz():
    m = manifest(30, 2, 10, seed=2)
    p = planner(m)
    run_ops(p, scripted_run(m, 40, 5, seed=1))
    state = p.state_dict(36)
    assert all(isinstance(v, int) or (isinstance(v, np.ndarray) and v.dtype.kind == "i") for v in state.values())
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    loaded = dict(np.load(buf, allow_pickle=False))
    a = BatchPlanner.from_state(*m, loaded, classes_per_batch=6, images_per_class=2, world_size=3, seed=5, max_lead=10**6)
    b = BatchPlanner.from_state(*m, state, classes_per_batch=6, images_per_class=2, world_size=3, seed=5, max_lead=10**6)
    for s in range(36, 50):
        np.testing.assert_array_equal(a.plan(s).sample_ids, b.plan(s).sample_ids)
    p.rewind(37)
    assert p.next_step == 37 and p.slowest() == 37


def test_state_errors_name_what_is_wrong():
    m = manifest(30, 2, 10)
    p = planner(m, rewind_window=2)
    for s in range(10):
        p.plan(s)
        take_all(p, s)
    with pytest.raises(ValueError, match="not planned yet"):
        p.state_dict(11)
    with pytest.raises(ValueError, match="rewind_window"):
        p.state_dict(5)
    state = p.state_dict(8)
    with pytest.raises(ValueError, match="seed"):
        BatchPlanner.from_state(*m, state, classes_per_batch=6, images_per_class=2, world_size=3, seed=6)
    with pytest.raises(ValueError, match="classes_per_batch"):
        BatchPlanner.from_state(*m, state, classes_per_batch=3, images_per_class=2, world_size=3, seed=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes_per_batch": 7, "world_size": 3}, "multiple of world_size"),
        ({"images_per_class": 0}, "images_per_class"),
        ({"classes_per_batch": 0}, "classes_per_batch"),
        ({"world_size": 0}, "world_size"),
        ({"max_lead": -1}, "max_lead"),
        ({"sampling": "hard"}, "sampling"),
        ({"selector": 3}, "selector"),
        ({"classes_per_batch": 30, "world_size": 3}, "classes_per_batch=30 needs"),
        ({"images_per_class": 9, "classes_per_batch": 6}, "images_per_class=9"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    m = manifest(20, 2, 8)
    with pytest.raises(ValueError, match=match):
        planner(m, **kwargs)


def test_bad_manifests_raise_value_errors():
    ids, starts, counts = manifest(20, 2, 8)
    with pytest.raises(ValueError, match="one length"):
        planner((ids, starts[:-1], counts))
    with pytest.raises(ValueError, match="overlap"):
        planner((ids, np.zeros(20, dtype=np.int64), counts))
    with pytest.raises(ValueError, match="distinct"):
        planner((np.zeros(20, dtype=np.int64), starts, counts))
    with pytest.raises(ValueError, match="integer"):
        planner((ids, starts.astype(float), counts))


def test_uniform_selector_is_uniform():
    # the reference: every class of 10 equally often in 5-of-10 draws
    rng = np.random.default_rng(0)
    hits = np.zeros(10)
    for _ in range(4000):
        hits[select_uniform(np.arange(10), 5, rng, np.ones(10))] += 1
    assert np.abs(hits / 4000 - 0.5).max() < 0.04


def test_the_planners_proportional_draw_matches_the_reference_selector():
    # the planner's rejection sampler and select_proportional (numpy's successive sampling)
    # must include each class equally often; weights 2..40 make inclusion far from uniform
    ids, starts, counts = manifest(12, 2, 40, seed=4)
    p = planner((ids, starts, counts), classes_per_batch=4, world_size=2, sampling="proportional")
    state = p._pass
    rng = np.random.default_rng(0)
    fast = np.zeros(12)
    slow = np.zeros(12)
    trials = 6000
    for _ in range(trials):
        got = p._select_proportional(state, 4, rng)
        assert np.unique(got).size == 4
        fast[got] += 1
        slow[select_proportional(state.active[: state.n_active], 4, rng, state.remaining)] += 1
    # inclusion frequencies: sd <= sqrt(0.25 / 6000) = 0.0065 each
    assert np.abs(fast / trials - slow / trials).max() < 0.035
    assert np.corrcoef(fast, counts)[0, 1] > 0.9
