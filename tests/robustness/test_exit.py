"""A host program that embeds the runtime exits normally: no hang at interpreter exit.

About one `nodule-edge infer` run in 30 on the real chest study once hung after finishing, in a
static destructor of SimpleITK's library (the CLI has left with ``os._exit`` since, see
``nodule_edge.cli.entry_point``). A program that embeds :class:`NoduleInferer` runs every
library's exit handlers, so it is checked here the way it hung: the same program many times, each
under a timeout. A run that finished its work and then timed out is an exit hang; its threads'
backtraces (gdb, when installed) go into the failure message.

Since issue 14 the DICOM path loads no SimpleITK at all (nodule_edge._sitk): each run also
checks that the library was never imported, so that no SimpleITK destructor runs at its exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

RUNS = 50
PARALLEL = 2  # the edge target's cores
RUN_TIMEOUT_S = 60.0  # one run takes 1-2 s on 2 cores

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from nodule_edge.runtime import NoduleInferer
    from nodule_edge.runtime.outputs import write_outputs

    study, out = sys.argv[1], Path(sys.argv[2])
    inferer = NoduleInferer(threads=1)
    result = inferer.infer(study, voxels=[(256, 256, 128)])
    write_outputs(result, out, inferer.spec)
    (out / "done").write_text("SimpleITK loaded" if "SimpleITK" in sys.modules else "done")
    """
)


def _backtrace(pid: int) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb not installed: no backtrace)"
    try:
        done = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "(gdb timed out)"
    return "\n".join(line for line in done.stdout.splitlines() if line.startswith(("#", "Thread")))[:6000]


def _run_once(k: int, script: Path, study: Path, root: Path, env: dict[str, str]) -> tuple[int, str]:
    """0 for a clean run; otherwise 1 with what went wrong."""
    out = root / f"run{k}"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(study), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        finished = (out / "done").exists()
        trace = _backtrace(proc.pid)
        proc.kill()
        proc.communicate()
        what = "hung at exit after finishing its work" if finished else "did not finish its work"
        return 1, f"run {k} {what} within {RUN_TIMEOUT_S:.0f} s:\n{trace}"
    if proc.returncode != 0 or not (out / "done").exists():
        return 1, f"run {k} failed with exit code {proc.returncode}: {stderr[-2000:]}"
    if (out / "done").read_text() != "done":
        return 1, f"run {k} imported SimpleITK on the DICOM path"
    return 0, ""


@pytest.mark.realdata
@pytest.mark.slow
def test_an_embedding_program_exits_normally_every_time(dicom_dir, tmp_path):
    study = dicom_dir / "chest_ricord_jpeg_lossless"
    if not study.is_dir():
        pytest.skip(f"{study} not found")
    script = tmp_path / "embed.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.pop("NODULE_EDGE_BUNDLE", None)  # the shipped bundle: no tiny-bundle build needed
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        outcomes = list(pool.map(lambda k: _run_once(k, script, study, tmp_path, env), range(RUNS)))
    elapsed = time.perf_counter() - start
    problems = [message for failed, message in outcomes if failed]
    print(
        f"\n{RUNS} runs of a program embedding NoduleInferer, {PARALLEL} at a time: {len(problems)} failed, {elapsed:.0f} s"
    )
    assert not problems, f"{len(problems)} of {RUNS} runs went wrong; first:\n{problems[0]}"
