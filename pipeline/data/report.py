"""Bad training samples: the reasons, the per-run report actor, and the bad-fraction check.

Every sample the run cannot use is counted under one of :data:`REASONS`: samples the index
left out (no image, no label, a label outside the manifest: ``pipeline.data.index``),
classes too small to pair, and samples the stream finds bad when it reads them (no JPEG
markers, does not decode, unreadable bytes). A :class:`DataReport` collects them with the
samples planned; the batch planner actor holds the run's report (``pipeline.data.
planner_actor``: the one place that sees every planned sample), and the driver reads it by
the actor's name with :func:`fetch_report` and writes it with :func:`write_report` (an
MLflow artifact). :func:`create_report` makes a stand-alone report actor.

``data.max_bad_fraction``: once at least :data:`MIN_SEEN` samples have been seen, a bad
fraction (reasons in :data:`FRACTION_REASONS`) above it stops the stream with a
:class:`DataQualityError` that names the first offending files. The minimum keeps one
early bad file (say 3 bad samples among the first 50) from killing a run whose data set
is fine overall; 200 samples bound the fraction's noise to a few per cent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REASONS = (
    "corrupt_image",  # JPEG bytes that do not decode (or do not start with the JPEG SOI marker)
    "truncated_image",  # JPEG bytes without the end-of-image marker (a cut file), or empty
    "missing_label",  # a sample with a .jpg but no (or an unparsable) .cls
    "missing_image",  # a sample with a .cls but no .jpg
    "unknown_label",  # a label that is not a class id of the shard set's manifest
    "small_class",  # a class with fewer than batch.images_per_class images: it can never be drawn
    "truncated_tar",  # a shard unreadable from some point on (cut or garbled); counted once per shard
    "empty_shard",  # a shard with no sample at all; counted once per shard
)
"""Why a sample was skipped; ``bad_counts[i]`` counts ``REASONS[i]``."""

FRACTION_REASONS = tuple(r for r in REASONS if r != "small_class")
"""Reasons that count towards ``data.max_bad_fraction``: broken data. A class too small to
pair is a property of the data set (LFW has many), skipped and counted but not an error."""

MIN_SEEN = 200
"""Samples seen before ``data.max_bad_fraction`` is enforced (module docstring)."""

MAX_ITEMS = 10_000
"""Bad items the report keeps in full; beyond that only the counts grow."""


class DataQualityError(RuntimeError):
    """Too many bad samples: the message names the reasons and the first offending files."""


def reason_index(reason: str) -> int:
    """Position of ``reason`` in :data:`REASONS`; ValueError for an unknown reason."""
    try:
        return REASONS.index(reason)
    except ValueError:
        raise ValueError(f"unknown bad-sample reason {reason!r}; known: {', '.join(REASONS)}") from None


def bad_fraction(counts, seen: int) -> float:
    """Bad samples (:data:`FRACTION_REASONS`) over samples seen; 0 when nothing was seen."""
    counts = np.asarray(counts)
    bad = sum(int(counts[REASONS.index(r)]) for r in FRACTION_REASONS)
    return bad / seen if seen > 0 else 0.0


def check_bad_fraction(counts, seen: int, max_fraction: float, items: list, min_seen: int = MIN_SEEN) -> None:
    """Raise :class:`DataQualityError` when the bad fraction exceeds ``max_fraction``.

    ``counts`` is indexed by :data:`REASONS`; ``items`` are ``(shard path, key, reason)``
    tuples, of which the first few are named. Nothing is checked before ``min_seen`` samples.
    """
    if seen < min_seen or max_fraction >= 1.0:
        return
    frac = bad_fraction(counts, seen)
    if frac <= max_fraction:
        return
    counts = np.asarray(counts)
    per = ", ".join(f"{r} {int(counts[i])}" for i, r in enumerate(REASONS) if counts[i])
    files = sorted({str(i[0]) for i in items})
    first = "; ".join(f"{p} [{k}] ({r})" for p, k, r in items[:5])
    raise DataQualityError(
        f"{frac:.1%} of the {seen} training samples seen so far are bad, above data.max_bad_fraction="
        f"{max_fraction} ({per}). Bad files ({len(files)}): {', '.join(files[:5])}"
        f"{f' and {len(files) - 5} more' if len(files) > 5 else ''}. First items: {first}. "
        "Rewrite or remove these shards (python -m jobs.make_shards), or raise data.max_bad_fraction.")


def _ray():
    import ray

    return ray


class DataReport:
    """Collects bad items and counts from the stream's stages (a Ray actor; see :func:`create_report`)."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(REASONS), dtype=np.int64)
        self.items: list[tuple[str, str, str]] = []
        self.seen = 0
        self.resumed_skip = 0
        self.decode_failures = 0
        self.unused = 0
        self.unused_ids: list[int] = []

    def add(self, items: list, seen: int | None = None, resumed_skip: int | None = None) -> list[int]:
        """Record ``(shard path, key, reason)`` items; ``seen`` / ``resumed_skip`` are the
        sender's cumulative totals (the planner's). Returns the counts after the update."""
        for path, key, reason in items:
            self.counts[reason_index(reason)] += 1
            if len(self.items) < MAX_ITEMS:
                self.items.append((str(path), str(key), str(reason)))
        if seen is not None:
            self.seen = max(self.seen, int(seen))
        if resumed_skip is not None:
            self.resumed_skip = max(self.resumed_skip, int(resumed_skip))
        return self.counts.tolist()

    def add_decode_failures(self, items: list) -> int:
        """Record images that failed to decode after composition (reason ``corrupt_image``);
        returns the run's total of such failures so far (the decode actors add it to the
        composer's counts, which do not include them)."""
        self.add(items)
        self.decode_failures += len(items)
        return self.decode_failures

    def add_unused(self, sample_ids) -> int:
        """Record good samples that were never trained on: pool leftovers (a class's last
        image when fewer than M remain, the pool at the end of the stream) and the good
        images of a row dropped because a whole class failed to decode. Returns the total."""
        ids = [int(i) for i in np.asarray(sample_ids).ravel()]
        self.unused += len(ids)
        self.unused_ids += ids[: max(0, 10 * MAX_ITEMS - len(self.unused_ids))]
        return self.unused

    def get_counts(self) -> list[int]:
        """The counts so far, indexed by :data:`REASONS`."""
        return self.counts.tolist()

    def fetch(self) -> dict:
        """Everything as plain types: see :func:`fetch_report`."""
        return {
            "counts": {r: int(c) for r, c in zip(REASONS, self.counts)},
            "bad_total": int(self.counts.sum()),
            "samples_seen": self.seen,
            "bad_fraction": bad_fraction(self.counts, self.seen),
            "resumed_skip": self.resumed_skip,
            "unused": self.unused,
            "unused_ids": list(self.unused_ids),
            "items": [{"shard": p, "key": k, "reason": r} for p, k, r in self.items],
            "items_left_out": int(self.counts.sum()) - len(self.items),
        }


def create_report(name: str, namespace: str | None = None):
    """The named :class:`DataReport` actor, created if it does not exist yet; returns its handle.

    Needs a connected Ray. Keep the handle referenced while the stream runs (the driver,
    for the whole fit): a non-detached actor dies with its creator's last handle. It
    reserves no CPU and survives no crash (``max_restarts=0``): a lost report costs the
    list, never the run, because the stages never wait for it except on a decode failure.
    """
    ray = _ray()
    cls = ray.remote(num_cpus=0, max_restarts=0)(DataReport)
    return cls.options(name=name, namespace=namespace, get_if_exists=True).remote()


def fetch_report(name: str, namespace: str | None = None, timeout_s: float = 30.0) -> dict:
    """The report of actor ``name``: ``{"counts": {reason: n}, "bad_total", "samples_seen",
    "bad_fraction", "resumed_skip", "unused", "unused_ids", "items": [{"shard", "key", "reason"}],
    "items_left_out"}``. ``unused``: good samples never trained on (``DataReport.add_unused``;
    the first 100,000 ids are kept).

    ``samples_seen``: the samples planned so far. Raises ValueError when no actor of
    that name exists.
    """
    ray = _ray()
    return ray.get(ray.get_actor(name, namespace=namespace).fetch.remote(), timeout=timeout_s)


def report_metrics(report: dict) -> dict[str, float]:
    """Run-level metrics from a :func:`fetch_report` dict, named like the stream's per-step
    ``data_metrics``: ``data/bad_<reason>`` (only the reasons that occurred), ``data/bad_total``, ``data/samples_seen``,
    ``data/bad_fraction``, ``data/resumed_skip``, plus ``data/unused`` (good samples never
    trained on: pool leftovers). For the driver to log once the fit has ended."""
    # One metric per reason that occurred (13 zero counters would open the run's metric list).
    out = {f"data/bad_{r}": float(report["counts"][r]) for r in REASONS if report["counts"].get(r, 0)}
    out.update({"data/bad_total": float(report["bad_total"]), "data/samples_seen": float(report["samples_seen"]),
                "data/bad_fraction": float(report["bad_fraction"]), "data/resumed_skip": float(report["resumed_skip"]),
                "data/unused": float(report["unused"])})
    return out


def write_report(report: dict | str, path: str | os.PathLike, namespace: str | None = None) -> Path:
    """Write a report (a :func:`fetch_report` dict, or the actor's name) as JSON to ``path``; returns the path."""
    if isinstance(report, str):
        report = fetch_report(report, namespace=namespace)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    return path


def raise_if_too_bad(name: str, max_bad_fraction: float, exc: BaseException) -> None:
    """After a failed fit: raise the ``DataQualityError`` that report ``name`` shows, from ``exc``.

    The stream stops a run with a :class:`DataQualityError` when bad samples exceed
    ``data.max_bad_fraction``, but it reaches the driver buried, and cut, in Ray Train's
    worker traceback; the report actor holds the same facts (reasons, files). Returns
    quietly when the report does not show too many bad samples or cannot be read (the
    original error then speaks for itself).
    """
    try:
        report = fetch_report(name)
    except Exception:  # noqa: BLE001 -- no report: let the original error speak
        return
    counts = [report["counts"].get(r, 0) for r in REASONS]
    items = [(i["shard"], i["key"], i["reason"]) for i in report["items"]]
    try:
        check_bad_fraction(counts, report["samples_seen"], max_bad_fraction, items)
    except DataQualityError as dq:
        raise dq from exc


def log_report(uri: str, run_id: str, name: str, step: int, retry_s: float) -> dict | None:
    """Log report ``name`` to MLflow run ``run_id``: ``data_report.json`` and the run-level ``data/*`` metrics at ``step``.

    ``data_report.json`` lists every skipped file, key and reason with the counts. Called
    when the fit ends, also when it failed (a ``data.max_bad_fraction`` stop names its files
    there too). Prints the counts when anything was skipped. Returns the report, or None when
    it could not be read or logged (printed, not raised: the run's own outcome matters more).
    Size: at most :data:`MAX_ITEMS` items (~1 MB of JSON) whatever the data set's size.
    """
    import sys
    import tempfile

    from pipeline import tracking

    try:
        report = fetch_report(name)
        with tempfile.TemporaryDirectory() as d:
            write_report(report, os.path.join(d, "data_report.json"))
            tracking.log_artifacts(uri, run_id, d, None, retry_s=retry_s)
        tracking.log_metrics(uri, run_id, report_metrics(report), step=step, retry_s=retry_s)
    except Exception as e:  # noqa: BLE001 -- a report is a by-product; never mask the run's own outcome
        print(f"[train] could not log the data report: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None
    if report["bad_total"]:
        counts = ", ".join(f"{r} {n}" for r, n in report["counts"].items() if n)
        print(f"[train] skipped {report['bad_total']} bad samples of {report['samples_seen']} ({counts}); "
              f"details in the run's data_report.json", flush=True)
    return report
