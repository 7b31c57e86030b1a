"""Checkpoints: safetensors weights with a JSON sidecar, and the optimiser state to resume from.

Nothing is pickled: the weights are safetensors, everything else JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodule_edge._files import atomic_file, write_text_atomic
from nodule_edge.errors import ConfigError, DataError
from nodule_edge.train.config import training_config_sha256
from nodule_edge.train.model import LEGACY_MODEL_CONFIG, CollaborativeNet, ModelConfig

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(path: Path, model: CollaborativeNet, meta: dict[str, Any]) -> None:
    """Weights as safetensors plus a JSON sidecar (model config, training config, metrics)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "nodule-edge-checkpoint-v1"})
    meta = {**meta, "model_config": dataclasses.asdict(model.config)}
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_checkpoint(path: str | Path) -> tuple[CollaborativeNet, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` (no pickle involved)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise DataError(f"checkpoint {path} or its sidecar {meta_path} is missing")
    meta = json.loads(meta_path.read_text())
    mc = {**LEGACY_MODEL_CONFIG, **meta["model_config"]}
    mc = {k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()}
    model = CollaborativeNet(ModelConfig(**mc))
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model, meta


#: The files beside ``last.safetensors`` that hold what only a run that goes on training needs.
OPTIMISER_STATE_FILES = ("last_optim.safetensors", "last_optim.json")

#: Random generators of a training run, saved with its resume state so that a resumed run draws
#: what an uninterrupted one would (numpy generators as JSON, torch generators as byte tensors).
RandomState = dict[str, "np.random.Generator | torch.Generator"]


def save_resume_state(
    path: Path,
    model: CollaborativeNet,
    opt: torch.optim.Optimizer,
    epoch: int,
    history: list,
    best: dict,
    meta: dict,
    generators: RandomState | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
) -> None:
    """Write the network, the optimiser state, the random generators and ``modules`` (trained
    beside the network but not part of it, e.g. the outline offset) for :func:`resume_state`."""
    from safetensors.torch import save_file

    save_checkpoint(path, model, {**meta, "epoch": epoch, "history": history, "best": best})
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in (modules or {}).items():
        for key, value in module.state_dict().items():
            tensors[f"module.{module_name}.{key}"] = value.detach().contiguous()
    scalars: dict[str, Any] = {}
    numpy_states: dict[str, Any] = {}
    for name, generator in (generators or {}).items():
        if isinstance(generator, np.random.Generator):
            numpy_states[name] = generator.bit_generator.state
        else:
            tensors[f"generator.{name}"] = generator.get_state()
    tensors["generator.torch_global"] = torch.get_rng_state()
    for _i, (pid, st) in enumerate(opt.state_dict()["state"].items()):
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = float(v)
    with atomic_file(path.with_name(OPTIMISER_STATE_FILES[0])) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(
        path.with_name(OPTIMISER_STATE_FILES[1]),
        json.dumps(
            {"scalars": scalars, "param_groups": opt.state_dict()["param_groups"], "numpy_generators": numpy_states}
        ),
    )


def resume_state(
    path: Path,
    model: CollaborativeNet,
    opt: torch.optim.Optimizer,
    training_sha: str,
    generators: RandomState | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
) -> tuple[int, list, dict, bool]:
    """Load the resume state written by :func:`save_resume_state` into ``model``, ``opt``,
    ``generators`` (those the state holds; a state written before generators were saved leaves
    them as they are, and the resumed run draws other augmentations than an uninterrupted one)
    and ``modules``. Without its optimiser state (``last_optim.*``: committed checkpoints do not
    keep it) only the network is loaded; the caller decides whether it can go on without it.

    Raises:
        ConfigError: The checkpoint was trained under another training configuration, or it lacks
            one of ``modules``, or one of the two optimiser-state files is missing.

    Returns:
        The epoch to continue at, the history, the best epoch so far and whether the optimiser
        state (with the generators and ``modules``) was loaded.
    """
    from safetensors.torch import load_file

    loaded, meta = load_checkpoint(path)
    # Checkpoints written before the hash existed carry none and are resumed as before; one whose
    # sidecar records its config is judged by the current rule (the rule once hashed the VOI
    # folder as each config file spells it, which made configs/ablations differ from the shipped one).
    recorded = (
        training_config_sha256(meta["config"])
        if isinstance(meta.get("config"), dict)
        else meta.get("training_config_sha256", training_sha)
    )
    if recorded != training_sha:
        raise ConfigError(
            f"{path.parent} holds a checkpoint trained with another configuration (data, model, loss or train "
            "section differ): move that folder away or restore the config it was trained with"
        )
    model.load_state_dict(loaded.state_dict())
    optimiser_files = [path.with_name(name) for name in OPTIMISER_STATE_FILES]
    missing = [p.name for p in optimiser_files if not p.is_file()]
    if len(missing) == len(optimiser_files):
        return int(meta["epoch"]) + 1, meta["history"], meta["best"], False
    if missing:
        raise ConfigError(f"{path.parent}: the optimiser state is incomplete ({missing[0]} missing)")
    tensors = load_file(str(optimiser_files[0]))
    extra = json.loads(optimiser_files[1].read_text())
    state: dict[int, dict[str, Any]] = {}
    for module_name, module in (modules or {}).items():
        prefix = f"module.{module_name}."
        saved = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(saved) != set(module.state_dict()):
            raise ConfigError(f"{path.parent}: the resume state holds no {module_name!r} to continue training")
        module.load_state_dict(saved)
    for key, v in tensors.items():
        if key.startswith("module."):
            continue
        pid, name = key.split(".", 1)
        if pid == "generator":
            if name == "torch_global":
                torch.set_rng_state(v)
            elif generators is not None and isinstance(generators.get(name), torch.Generator):
                generators[name].set_state(v)  # type: ignore[union-attr]
            continue
        state.setdefault(int(pid), {})[name] = v
    for name, numpy_state in extra.get("numpy_generators", {}).items():
        generator = (generators or {}).get(name)
        if isinstance(generator, np.random.Generator):
            generator.bit_generator.state = numpy_state
    for key, v in extra["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(v)
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
    return int(meta["epoch"]) + 1, meta["history"], meta["best"], True
