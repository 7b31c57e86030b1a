"""Two-process DDP training (gloo on CPU) through ``torchrun -m nodule_edge.cli train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nodule_edge.train.trainer import load_checkpoint

MODELS = {
    "shipped": "",
    # No attribute loss: the attribute head must still get (zero) gradients for DDP.
    "no_extras": "use_attributes = false\nconcat_embedding = false",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchrun_two_processes(name: str, tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    loss = "debug = false" if name == "no_extras" else ""
    config = tiny_config(model=MODELS[name], loss=loss)
    # `python -m torch.distributed.run` is the torchrun entry point, from this interpreter's venv.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "nodule_edge.cli", "train", str(config),
        # Two steps per epoch and two epochs: DDP's unused-parameter error shows on the second step.
        "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=2", "--set", "cv.final=true",
        # The head refit is a single-process step after training (tests/train/test_trainer.py runs it);
        # under torchrun every rank would repeat it, past this test's time limit on two cores.
        "--set", 'head.refit="none"',
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr

    out = tmp_path / "out"
    for ckpt in (out / "fold0" / "best.safetensors", out / "final" / "last.safetensors"):
        model, meta = load_checkpoint(ckpt)
        assert model.config.use_attributes is (name != "no_extras")
    last = json.loads((out / "fold0" / "last.json").read_text())
    assert [h["epoch"] for h in last["history"]] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert "0" in summary["folds"] and "final" in summary
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
