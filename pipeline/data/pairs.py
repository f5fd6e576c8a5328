"""LFW's ``pairs.txt``: the verification pairs of a face data set (a data-set file, read by the
``lfw`` layout to check its images and by the verification protocol to score them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

HEADERLESS_FOLDS = 10
"""Folds assigned round-robin (line i -> fold i % 10) when a pairs file has no header."""


@dataclass(frozen=True)
class VerificationPair:
    """One LFW pair: two image keys, whether they show the same person, and its fold."""

    left: str
    """Image key ``<name>/<name>_<nnnn>`` of the first image."""
    right: str
    """Image key of the second image."""
    is_same: bool
    """True for a matched pair (same person)."""
    fold: int
    """Cross-validation fold, 0-based."""


def image_key(name: str, number: int) -> str:
    """Return LFW's image key ``<name>/<name>_<nnnn>`` (number zero-padded to 4 digits)."""
    return f"{name}/{name}_{number:04d}"


def read_lfw_pairs(path: str | os.PathLike) -> list[VerificationPair]:
    """Parse an LFW pairs file and return its pairs in file order.

    Layouts accepted:
      * ``pairs.txt``: header ``<folds> <n>``, then per fold n matched lines
        ``name n1 n2`` followed by n mismatched lines ``name1 n1 name2 n2``;
      * ``pairsDevTrain.txt``/``pairsDevTest.txt``: header ``<n>``, then n matched
        and n mismatched lines, all in fold 0;
      * no header: any mix of matched/mismatched lines, folds assigned
        round-robin (pair i -> fold i % 10) so that 10-fold accuracy still runs.
    Blank lines are skipped. Raises ValueError naming the file and line for a
    malformed line, a matched/mismatched line in the wrong section, or a pair
    count that disagrees with the header; OSError if the file cannot be read.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = [(i, line.split()) for i, line in enumerate(f, start=1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no pairs found (empty file)")

    header_no, header = lines[0]
    if len(header) in (1, 2) and all(t.isdigit() for t in header):
        n_folds, per_side = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
        body = lines[1:]
        expected = n_folds * 2 * per_side
        if len(body) != expected:
            raise ValueError(
                f"{path}:{header_no}: header {' '.join(header)!r} promises {expected} pairs "
                f"({n_folds} folds x {per_side} matched + {per_side} mismatched), found {len(body)}"
            )
        pairs = []
        for j, (line_no, tokens) in enumerate(body):
            fold, pos = divmod(j, 2 * per_side)
            pair = _parse_pair(path, line_no, tokens, fold)
            want_same = pos < per_side
            if pair.is_same != want_same:
                kind = "matched 'name n1 n2'" if want_same else "mismatched 'name1 n1 name2 n2'"
                raise ValueError(f"{path}:{line_no}: expected a {kind} line in fold {fold}, got {' '.join(tokens)!r}")
            pairs.append(pair)
        return pairs
    return [_parse_pair(path, line_no, tokens, j % HEADERLESS_FOLDS) for j, (line_no, tokens) in enumerate(lines)]


def _parse_pair(path: str, line_no: int, tokens: list[str], fold: int) -> VerificationPair:
    try:
        if len(tokens) == 3:
            name, a, b = tokens
            return VerificationPair(image_key(name, _image_number(a)), image_key(name, _image_number(b)), True, fold)
        if len(tokens) == 4:
            name1, a, name2, b = tokens
            return VerificationPair(image_key(name1, _image_number(a)), image_key(name2, _image_number(b)), False, fold)
    except ValueError as e:
        raise ValueError(f"{path}:{line_no}: {e} in {' '.join(tokens)!r}") from None
    raise ValueError(
        f"{path}:{line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {len(tokens)} fields: {' '.join(tokens)!r}"
    )


def _image_number(token: str) -> int:
    if not token.isdigit() or int(token) < 1:
        raise ValueError(f"image number must be a positive integer, got {token!r}")
    return int(token)
