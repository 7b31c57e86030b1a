"""The ``nodule-edge`` command line: parses, delegates, formats. Exit codes live here only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from nodule_edge import __version__
from nodule_edge.errors import NoduleEdgeError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("nodule_edge")


def _handle_errors(func: F) -> F:
    """Turn the package's own exceptions into one line on stderr and their exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NoduleEdgeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _not_implemented(name: str) -> None:
    click.secho(f"error: 'nodule-edge {name}' is not implemented yet in this version", fg="red", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nodule-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Interpretable lung-nodule diagnosis from CT, fast on a CPU.

    Malignancy probability, six radiologist attributes, a 3D segmentation, a Grad-CAM saliency
    map with a trust check, and the most similar historical nodules.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
def infer() -> None:
    """Diagnose nodules at given locations of a DICOM study or volume file."""
    _not_implemented("infer")


@main.command()
def evaluate() -> None:
    """Run the runtime on a folder of nodule VOIs and write per-nodule predictions."""
    _not_implemented("evaluate")


@main.command()
def demo() -> None:
    """Run infer end to end on the bundled study."""
    _not_implemented("demo")


@main.command()
def train() -> None:
    """Train the collaborative model from a config file."""
    _not_implemented("train")


@main.command()
def export() -> None:
    """Export a checkpoint to ONNX / CPU engine / TensorRT / Triton artifacts."""
    _not_implemented("export")


@main.group()
def index() -> None:
    """Build, extend and query the similar-nodule index."""
