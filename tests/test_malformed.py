"""Malformed checkpoints fail cleanly: one error naming the file, from the header alone.

Each case corrupts one model of a NAN recipe. ``mergekit-nan check`` reports
it as ``incomplete-model`` naming the file, and the stock ``mergekit-yaml``
stops with the same words before creating the output directory, never with
a traceback, a hang or a large allocation. A property test feeds arbitrary
bytes to the header reader.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import build_recipe, run_command, write_recipe

from mergekit_nan.doctor.model_files import collect_models
from mergekit_nan.doctor.safetensors_header import HeaderError, read_safetensors_header


def encode(header: object, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian length, the JSON header, the data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def rewrite_header(path: Path, change: Callable[[Dict], None]) -> None:
    """Apply ``change`` to the header of the safetensors file at ``path``, keeping its data."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    change(header)
    path.write_bytes(encode(header, blob[8 + length :]))


def first_tensor(header: Dict) -> Dict:
    return header[next(name for name in header if name != "__metadata__")]


def set_dtype(header: Dict) -> None:
    first_tensor(header)["dtype"] = "F7"


def shrink_range(header: Dict) -> None:
    entry = first_tensor(header)
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 6]


def overlap(header: Dict) -> None:
    names = [name for name in header if name != "__metadata__"]
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    header[names[1]]["shape"] = list(header[names[0]]["shape"])
    header[names[1]]["dtype"] = header[names[0]]["dtype"]


def long_length(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob) * 2) + blob[8:])


def huge_length(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 62) + blob[8:])


def broken_json(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[8] = ord("[")
    path.write_bytes(bytes(blob))


def truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])


CASES: Dict[str, tuple] = {
    # case: (corruption of model.safetensors, words the error contains)
    "length beyond the file": (long_length, "header but the file holds"),
    "absurd length": (huge_length, "header but the file holds"),
    "invalid JSON": (broken_json, "unreadable safetensors header"),
    "header not an object": (
        lambda p: p.write_bytes(encode([1, 2, 3])),
        "header that is not a JSON object",
    ),
    "unknown dtype": (lambda p: rewrite_header(p, set_dtype), "unknown dtype 'F7'"),
    "range not shape x dtype": (lambda p: rewrite_header(p, shrink_range), "needs"),
    "overlapping ranges": (lambda p: rewrite_header(p, overlap), "overlap"),
    "truncated data": (truncate, "truncated"),
}


@pytest.fixture
def corrupted(family, tmp_path) -> Callable[[str], Path]:
    def make(case: str) -> Path:
        model = tmp_path / "broken"
        shutil.copytree(family[2], model)
        CASES[case][0](model / "model.safetensors")
        return model

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_check_and_the_stock_command_name_the_file(case, family, corrupted, tmp_path):
    broken = corrupted(case)
    words = CASES[case][1]
    recipe = write_recipe(
        tmp_path / "recipe.yml", build_recipe([family[1], broken], base=family[0])
    )
    checked = run_command("mergekit-nan", "check", str(recipe))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    (error,) = [x for x in checked.stdout.splitlines() if x.startswith("error: ")]
    assert "incomplete-model" not in error  # codes are for --json; the line is words
    assert error.startswith("error: models[1].model: ") and words in error
    assert str(broken / "model.safetensors") in error or "truncated" in error

    out = tmp_path / "merged"
    stock = run_command("mergekit-yaml", str(recipe), str(out), "--no-copy-tokenizer")
    assert stock.returncode == 1 and "Traceback" not in stock.stderr
    last = stock.stderr.strip().splitlines()[-1].strip()
    assert last == error and not out.exists()


def test_an_index_naming_a_missing_shard(tiny_families, tmp_path):
    family = tiny_families.get("qwen3", layout="sharded")
    broken = tmp_path / "sharded"
    shutil.copytree(family.tuned[0], broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.unlink()
    recipe = write_recipe(
        tmp_path / "recipe.yml", build_recipe([family.paths[1], broken], base=family.paths[0])
    )
    checked = run_command("mergekit-nan", "check", str(recipe))
    (error,) = [x for x in checked.stdout.splitlines() if x.startswith("error: ")]
    assert f"shard {shard.name} listed in its index is missing" in error


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash_the_header_reader(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "model.safetensors"
    path.write_bytes(blob)
    try:
        tensors, size = read_safetensors_header(str(path))
    except HeaderError as error:
        assert str(path) in str(error)
    else:
        assert size >= 8 and all(t.nbytes == t.numel * t.itemsize for t in tensors.values())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "__metadata__"]),
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.sampled_from(["F32", "BF16", "I8", "F7", 3]) | JSON,
                "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
                "data_offsets": st.lists(st.integers(-2, 80), max_size=3) | JSON,
            },
        )
        | JSON,
        max_size=3,
    ),
    st.binary(max_size=80),
)
def test_arbitrary_headers_give_facts_or_one_named_problem(tmp_path_factory, header, data):
    model = tmp_path_factory.mktemp("model", numbered=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(encode(header, data))
    (facts,) = collect_models({"merge_method": "nan", "models": [{"model": str(model)}]})
    problems = facts.problems + facts.truncated
    if problems:
        assert len(problems) == 1 and str(model / "model.safetensors") in problems[0]
    else:
        assert facts.tensors is not None
        for tensor in facts.tensors.values():
            assert tensor.nbytes == tensor.numel * tensor.itemsize
