"""Triton model repository: config.pbtxt parsed back and checked against the ONNX graph."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from nodule_edge.errors import ConfigError, EngineError, OutputError
from nodule_edge.export.triton import write_triton_repository
from nodule_edge.runtime.engines.tensorrt_sidecar import EngineSidecar, sidecar_path_for
from tests.export.tiny_onnx import OUTPUT_SHAPES, write_tiny_onnx

# ---------------------------------------------------------------------------------------------
# A parser for the protobuf text format subset config.pbtxt uses (messages, lists, scalars)
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([-\w.]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            if text[pos:].strip():
                raise ValueError(f"unexpected text at {pos}: {text[pos : pos + 20]!r}")
            break
        pos = match.end()
        if match.group(1) is None:
            out.append(next(g for g in match.groups()[1:] if g is not None))
    return out


def _value(tokens: list[str], i: int) -> tuple[Any, int]:
    tok = tokens[i]
    if tok == "{":
        return _message(tokens, i + 1, "}")
    if tok.startswith('"'):
        return json.loads(tok), i + 1
    if re.fullmatch(r"-?\d+", tok):
        return int(tok), i + 1
    return tok, i + 1  # enum or bool


def _message(tokens: list[str], i: int, end: str | None) -> tuple[dict[str, list[Any]], int]:
    fields: dict[str, list[Any]] = {}
    while i < len(tokens) and tokens[i] != end:
        name = tokens[i]
        i += 1
        if tokens[i] == ":":
            i += 1
        if tokens[i] == "[":
            i += 1
            while tokens[i] != "]":
                value, i = _value(tokens, i)
                fields.setdefault(name, []).append(value)
                if tokens[i] == ",":
                    i += 1
            i += 1
        else:
            value, i = _value(tokens, i)
            fields.setdefault(name, []).append(value)
    if end is not None:
        if i >= len(tokens):
            raise ValueError(f"missing {end!r}")
        i += 1
    return fields, i


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Parse protobuf text into ``{field: [values]}`` (every field as a list)."""
    tokens = _tokens(text)
    fields, i = _message(tokens, 0, None)
    if i != len(tokens):
        raise ValueError("trailing tokens")
    return fields


def test_pbtxt_parser_understands_the_triton_doc_example() -> None:
    doc = 'platform: "tensorrt_plan"\nmax_batch_size: 8\ninput [ { name: "input0" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "in1" dims: [ 1 ] reshape: { shape: [ ] } } ]\n# c\ninstance_group [ { count: 2 kind: KIND_GPU gpus: [ 1, 2 ] } ]'
    parsed = parse_pbtxt(doc)
    assert parsed["platform"] == ["tensorrt_plan"] and parsed["max_batch_size"] == [8]
    assert parsed["input"][0] == {"name": ["input0"], "data_type": ["TYPE_FP32"], "dims": [16]}
    assert parsed["input"][1]["reshape"] == [{}]
    assert parsed["instance_group"] == [{"count": [2], "kind": ["KIND_GPU"], "gpus": [1, 2]}]


# ---------------------------------------------------------------------------------------------
# Expected values straight from the ONNX graph
# ---------------------------------------------------------------------------------------------

_TRITON_TYPE = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.INT64: "TYPE_INT64"}


def _expected(value_info: onnx.ValueInfoProto) -> dict[str, list[Any]]:
    dims = value_info.type.tensor_type.shape.dim
    assert dims[0].dim_param, f"{value_info.name}: test model must have a dynamic batch"
    rest = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
    entry: dict[str, list[Any]] = {
        "name": [value_info.name],
        "data_type": [_TRITON_TYPE[value_info.type.tensor_type.elem_type]],
        "dims": rest or [1],
    }
    if not rest:
        entry["reshape"] = [{}]  # reshape: { shape: [ ] }
    return entry


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    return write_tiny_onnx(tmp_path / "model.onnx")


def test_onnx_model_config_matches_graph(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = write_triton_repository(tiny_onnx, tmp_path / "repo", max_batch_size=16, instance_count=2)
    config = parse_pbtxt((tmp_path / "repo" / "nodule_edge" / "config.pbtxt").read_text())
    graph = onnx.load(str(tiny_onnx)).graph

    assert config["name"] == ["nodule_edge"]
    assert config["platform"] == ["onnxruntime_onnx"] and config["backend"] == ["onnxruntime"]
    assert config["default_model_filename"] == ["model.onnx"]
    assert config["max_batch_size"] == [16]
    assert config["dynamic_batching"] == [{"max_queue_delay_microseconds": [100]}]
    assert config["instance_group"] == [{"kind": ["KIND_GPU"], "count": [2]}]
    assert config["input"] == [_expected(v) for v in graph.input]
    assert config["output"] == [_expected(v) for v in graph.output]
    assert [o["name"][0] for o in config["output"]] == list(OUTPUT_SHAPES)
    # Spot-check the interface itself, so a broken test model cannot hide a broken config.
    by_name = {o["name"][0]: o for o in config["input"] + config["output"]}
    assert by_name["patch"]["dims"] == [2, 64, 64, 64]
    assert by_name["malignancy_probability"]["dims"] == [1] and by_name["malignancy_probability"]["reshape"] == [{}]
    assert by_name["attributes"]["dims"] == [6] and "reshape" not in by_name["attributes"]
    assert by_name["segmentation"]["dims"] == [64, 64, 64]
    assert by_name["embedding"]["dims"] == [64]

    copied = tmp_path / "repo" / "nodule_edge" / "1" / "model.onnx"
    assert _sha(copied) == _sha(tiny_onnx)
    assert repo.onnx_model == tmp_path / "repo" / "nodule_edge" and repo.tensorrt_model is None
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["nodule_edge"]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_config_dims_follow_the_graph_not_a_fixed_interface(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 3, "width"])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    write_triton_repository(
        path,
        tmp_path / "repo",
        model_name="other",
        max_batch_size=4,
        instance_kind="KIND_CPU",
        max_queue_delay_microseconds=500,
    )
    config = parse_pbtxt((tmp_path / "repo" / "other" / "config.pbtxt").read_text())
    assert config["input"] == [{"name": ["x"], "data_type": ["TYPE_FP32"], "dims": [3, -1]}]
    assert config["output"] == [{"name": ["y"], "data_type": ["TYPE_FP16"], "dims": [3, -1]}]
    assert config["instance_group"] == [{"kind": ["KIND_CPU"], "count": [1]}]
    assert config["dynamic_batching"] == [{"max_queue_delay_microseconds": [500]}]


def test_without_batching_dims_keep_the_batch_dimension(tiny_onnx: Path, tmp_path: Path) -> None:
    write_triton_repository(tiny_onnx, tmp_path / "repo", max_batch_size=0)
    config = parse_pbtxt((tmp_path / "repo" / "nodule_edge" / "config.pbtxt").read_text())
    assert config["max_batch_size"] == [0] and "dynamic_batching" not in config
    by_name = {o["name"][0]: o for o in config["input"] + config["output"]}
    assert by_name["patch"]["dims"] == [-1, 2, 64, 64, 64]
    assert by_name["malignancy_probability"]["dims"] == [-1] and "reshape" not in by_name["malignancy_probability"]


def test_fixed_batch_model_cannot_be_batched(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ConfigError, match=r"'x' has shape \[1, 4\].*dynamic batch"):
        write_triton_repository(path, tmp_path / "repo")
    assert not (tmp_path / "repo" / "nodule_edge").exists()


# ---------------------------------------------------------------------------------------------
# With a TensorRT engine
# ---------------------------------------------------------------------------------------------


def _fake_engine(tmp_path: Path, onnx_sha256: str, max_batch: int = 16) -> Path:
    engine = tmp_path / "engine" / "model.plan"
    engine.parent.mkdir()
    engine.write_bytes(b"not a real engine")
    EngineSidecar(
        tensorrt_version="10.3.0",
        gpu_name="NVIDIA L4",
        compute_capability="8.9",
        onnx_sha256=onnx_sha256,
        engine_sha256=_sha(engine),
        precision="fp16",
        input_name="patch",
        profile=(1, 4, max_batch),
    ).write(sidecar_path_for(engine))
    return engine


def test_engine_gets_a_tensorrt_plan_model_with_the_same_tensors(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, _sha(tiny_onnx))
    repo = write_triton_repository(tiny_onnx, tmp_path / "repo", engine_path=engine, instance_kind="KIND_CPU")
    onnx_config = parse_pbtxt((repo.onnx_model / "config.pbtxt").read_text())
    assert repo.tensorrt_model == tmp_path / "repo" / "nodule_edge_trt"
    trt_config = parse_pbtxt((repo.tensorrt_model / "config.pbtxt").read_text())

    assert trt_config["name"] == ["nodule_edge_trt"]
    assert trt_config["platform"] == ["tensorrt_plan"] and trt_config["backend"] == ["tensorrt"]
    assert trt_config["default_model_filename"] == ["model.plan"]
    assert trt_config["instance_group"] == [{"kind": ["KIND_GPU"], "count": [1]}]  # plans only run on GPUs
    assert onnx_config["instance_group"] == [{"kind": ["KIND_CPU"], "count": [1]}]
    assert trt_config["input"] == onnx_config["input"] and trt_config["output"] == onnx_config["output"]
    assert (repo.tensorrt_model / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert EngineSidecar.read(repo.tensorrt_model / "1" / "model.plan.json") == EngineSidecar.read(
        sidecar_path_for(engine)
    )


def test_engine_from_another_model_is_refused_and_nothing_written(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, "f" * 64)
    with pytest.raises(EngineError, match="another ONNX model"):
        write_triton_repository(tiny_onnx, tmp_path / "repo", engine_path=engine)
    assert not (tmp_path / "repo").exists()


def test_batch_larger_than_engine_profile_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, _sha(tiny_onnx), max_batch=8)
    with pytest.raises(EngineError, match="max_batch_size 16 exceeds .* 8"):
        write_triton_repository(tiny_onnx, tmp_path / "repo", engine_path=engine)
    write_triton_repository(tiny_onnx, tmp_path / "repo", engine_path=engine, max_batch_size=8)


# ---------------------------------------------------------------------------------------------
# Safety of the write
# ---------------------------------------------------------------------------------------------


def test_existing_model_is_kept_unless_overwrite(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "other_model").mkdir(parents=True)
    write_triton_repository(tiny_onnx, repo)
    stale = repo / "nodule_edge" / "1" / "stale.txt"
    stale.write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        write_triton_repository(tiny_onnx, repo, max_batch_size=4)
    assert parse_pbtxt((repo / "nodule_edge" / "config.pbtxt").read_text())["max_batch_size"] == [16]
    write_triton_repository(tiny_onnx, repo, max_batch_size=4, overwrite=True)
    assert parse_pbtxt((repo / "nodule_edge" / "config.pbtxt").read_text())["max_batch_size"] == [4]
    assert not stale.exists()
    assert sorted(p.name for p in repo.iterdir()) == ["nodule_edge", "other_model"]  # others untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"model_name": "../escape"}, "model name"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"instance_count": 0}, "instance_count"),
        ({"instance_kind": "KIND_TPU"}, "instance_kind"),
        ({"max_queue_delay_microseconds": -5}, "max_queue_delay_microseconds"),
    ],
)
def test_bad_arguments_rejected(tiny_onnx: Path, tmp_path: Path, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        write_triton_repository(tiny_onnx, tmp_path / "repo", **kwargs)
    assert fragment in str(err.value)
    assert not (tmp_path / "repo").exists()


def test_missing_inputs_rejected(tmp_path: Path, tiny_onnx: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        write_triton_repository(tmp_path / "absent.onnx", tmp_path / "repo")
    with pytest.raises(ConfigError, match="does not exist"):
        write_triton_repository(tiny_onnx, tmp_path / "repo", engine_path=tmp_path / "absent.plan")
