"""What the ``nodule-edge`` commands share: error handler and exit codes, point parsing, backends.

Commands call the inferer factory as ``_common._make_inferer`` (looked up at call time), so that
tests can stub the model out in one place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

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
            # One line: messages may quote multi-line errors from decoders or engines.
            click.secho("error: " + " ".join(str(exc).split()), fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: say so briefly, details at -vv
            log.debug("unexpected error", exc_info=True)
            click.secho(
                f"internal error: {type(exc).__name__}: {exc} (run with -vv for details; please report)",
                fg="red",
                err=True,
            )
            sys.exit(70)

    return wrapper  # type: ignore[return-value]


def _parse_point(value: str, option: str) -> tuple[float, float, float]:
    parts = value.split(",")
    if len(parts) != 3:
        raise click.BadParameter(f"expected three comma-separated numbers X,Y,Z, got {value!r}", param_hint=option)
    try:
        point = tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected numbers in X,Y,Z, got {value!r}", param_hint=option) from None
    if not all(p == p and abs(p) != float("inf") for p in point):
        raise click.BadParameter(f"coordinates must be finite, got {value!r}", param_hint=option)
    return point  # type: ignore[return-value]


def _backend_choice() -> click.Choice:
    # The backend table (nodule_edge/runtime/engines/backends.py) is the one list of backends.
    from nodule_edge.runtime.engines.backends import ALL_BACKENDS

    return click.Choice(["auto", *ALL_BACKENDS])


_BACKEND_CHOICE = _backend_choice()

#: The options several commands share, defined once.
backend_option = click.option(
    "--backend", type=_BACKEND_CHOICE, default="auto", show_default=True, help="Inference engine."
)
bundle_option = click.option(
    "--bundle",
    default=None,
    type=click.Path(path_type=str),
    help="Model bundle folder (default: the shipped bundle, or $NODULE_EDGE_BUNDLE).",
)


def _make_inferer(bundle: str | None, backend: str, top_k: int, threads: int | None = None) -> Any:
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(bundle, backend=backend, top_k=top_k, threads=threads)
