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
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set train.epochs=2 (value parsed as TOML).")
@click.option("--folds-only", is_flag=True, help="Run the configured CV folds but not the final model.")
@_handle_errors
def train(config: str, overrides: tuple[str, ...], folds_only: bool) -> None:
    """Train the collaborative model from a TOML/JSON CONFIG (see configs/shipped.toml).

    Runs patient-disjoint cross-validation folds (checkpoints as safetensors + JSON, resumable:
    re-run the same command to continue), then the final model on all data with the CV-chosen
    epoch count. Multi-process: torchrun --nproc-per-node 2 -m nodule_edge.cli train CONFIG.
    """
    import tomllib

    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            parsed[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key] = value
    from nodule_edge.errors import require

    require("torch", "train")
    from nodule_edge.train.config import load_config
    from nodule_edge.train.run import run_training

    cfg = load_config(config, parsed)
    summary = run_training(cfg, progress=lambda msg: click.echo(msg, err=True), folds_only=folds_only)
    for fold, result in summary["folds"].items():
        m = result["malignancy"]
        click.echo(f"fold {fold}: AUC {m['auc']:.3f} accuracy {m['accuracy']:.3f} dice {result.get('dice_mean', float('nan')):.3f}")
    if "final" in summary:
        click.echo(f"final checkpoint: {summary['final']['checkpoint']}")


@main.command()
def export() -> None:
    """Export a checkpoint to ONNX / CPU engine / TensorRT / Triton artifacts."""
    _not_implemented("export")


@main.group()
def index() -> None:
    """Build, extend and query the similar-nodule index."""


if __name__ == "__main__":
    main()
