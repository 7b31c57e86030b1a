"""No network: loading the runtime and diagnosing a study make no connection and no DNS lookup.

OpenVINO's usage telemetry would send an event when ``openvino`` is imported (README, Engines);
the runtime imports it with the telemetry masked. Checked in a fresh interpreter whose socket
layer records and refuses every outside connection attempt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys, time
    log = sys.argv[3]

    def refuse(*args, **kwargs):
        # Appended to a file: OpenVINO's telemetry sends from a forked child process.
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {args[:2]!r}\\n")
        raise OSError("network access refused by the test")

    socket.getaddrinfo = refuse
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    socket.socket.connect = connect
    from nodule_edge.runtime import NoduleInferer
    from nodule_edge.runtime.demo import write_demo_study

    inferer = NoduleInferer(backend=sys.argv[1], top_k=5)
    folder, voxel = write_demo_study(sys.argv[2])
    p = inferer.infer(folder, voxels=[voxel]).nodules[0].malignancy_probability
    time.sleep(2.0)  # telemetry senders run on background threads and processes
    print(json.dumps({"p": p, "backend": inferer.backend}))
    """
)


@pytest.mark.parametrize("backend", ["cpu-fast", "cpu"])
def test_runtime_makes_no_network_request(backend, tmp_path):
    if backend == "cpu-fast":
        pytest.importorskip("openvino")
    log = tmp_path / "attempts.txt"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, str(tmp_path / "study"), str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["backend"] == backend and 0.0 <= info["p"] <= 1.0
    attempts = log.read_text().splitlines() if log.exists() else []
    assert attempts == [], f"network attempts: {attempts}"
