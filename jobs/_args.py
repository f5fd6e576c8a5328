"""Command-line pieces that jobs.embed and jobs.search share."""

from __future__ import annotations

import argparse


def job_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A job's parser: its module docstring as the help text, kept as written."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_image_source(p: argparse.ArgumentParser, folder: str, other: str, other_help: str) -> None:
    """The required choice between an image folder (``folder`` flag) and ``other`` (a file or shard set)."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(folder, default="", help="image folder (DIR/<label>/<image> gives each image its label)")
    group.add_argument(other, default="", help=other_help)


def add_tracking_uri(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
