"""The ``nodule-edge`` command line: parses, delegates, formats. Exit codes live in this package only.

This module holds the ``main`` group (logging setup), the console script :func:`entry_point` and
the registration of the commands; the commands live in the sibling modules ``infer`` (infer,
infer-batch, demo), ``evaluate``, ``train`` (train, cv-report, cv-compare, explain-compare, export) and
``index`` (index build/add/query), and what they share (error handler and exit codes, point
parsing, backend choice, the inferer factory) in ``_common``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import click

from nodule_edge import __version__
from nodule_edge._sitk import show_warnings
from nodule_edge.cli import evaluate, index, infer, train
from nodule_edge.cli._common import log


def _console_filter(verbose: int) -> Callable[[logging.LogRecord], bool]:
    """Which log records reach the console: the package's own always, other libraries' from -v on.

    Other libraries' records are details behind the package's own message: pydicom's decoder
    plugins, for one, log every failure with a full traceback before the one-line error. They show
    at WARNING and above with -v, all of them with -vv.
    """

    def keep(record: logging.LogRecord) -> bool:
        if record.name == log.name or record.name.startswith(log.name + "."):
            return True
        return verbose >= 2 or (verbose == 1 and record.levelno >= logging.WARNING)

    return keep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nodule-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-v info and other libraries' warnings, -vv debug).")
def main(verbose: int) -> None:
    """Interpretable lung-nodule diagnosis from CT, fast on a CPU.

    Malignancy probability, six radiologist attributes, a 3D segmentation, a Grad-CAM saliency
    map with a trust check, and the most similar historical nodules.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_console_filter(verbose))
    logging.basicConfig(level=level, handlers=[handler])
    # Libraries' Python warnings (pydicom on odd tag values, ...) pass the same filter.
    logging.captureWarnings(True)
    # ITK prints its warnings to stderr itself (no logger to filter); they are details as well.
    # SimpleITK is not imported for this: the setting applies whenever a command loads it.
    show_warnings(verbose > 0)


def entry_point() -> None:
    """The ``nodule-edge`` console script: :func:`main`, then leave without C++ static destructors.

    About 1 run in 30 of ``nodule-edge infer`` on the real chest study once hung after it had
    finished (report written, exit code decided), in a static destructor of SimpleITK's library run
    from ``__run_exit_handlers``. That was when python-gdcm read the headers and SimpleITK's GDCM
    decoded the slices on two threads, neither of which the default path does now; the hang has
    not been reproduced since (no hang in 450 runs of :func:`main` exiting normally, nor in 260 runs
    of the code of that time; tests/robustness/test_exit.py checks a program that embeds the
    library). The default path (a DICOM study decoded by imagecodecs or pydicom) no longer loads
    SimpleITK at all (:mod:`nodule_edge._sitk`); volume files and GDCM decoding still do. With the
    cause unknown the guard stays: every output is written, renamed into place and closed before
    this point, so the process flushes its streams and ends with ``os._exit``, which skips those
    destructors.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): Python would print it and exit with 1
            click.echo(str(exc.code), err=True)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


# The commands, registered here rather than by importing their modules for a side effect.
main.add_command(infer.infer)
main.add_command(infer.infer_batch)
main.add_command(evaluate.evaluate)
main.add_command(infer.demo)
main.add_command(train.export)
main.add_command(train.train)
main.add_command(train.cv_report)
main.add_command(train.cv_compare)
main.add_command(train.explain_compare)
main.add_command(index.index)
