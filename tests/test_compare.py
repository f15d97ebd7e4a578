"""``mergekit-nan compare``: its numbers against an independent computation, and its errors.

The independent side merges each candidate's recipe (read from compare's
``--json``) with the stock ``mergekit-yaml`` (``mergekit-nan merge`` for layer
granularity) and scores it with a plain ``transformers`` loop, one document at
a time, over the same tokens.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from support import build_recipe, load_model_tensors, run_command, run_mergekit_yaml, write_recipe

from mergekit_nan.commands.compare import score as compare_score
from mergekit_nan.doctor.heldout import DataError, load_documents
from mergekit_nan.evaluation import DocumentLosses

MAX_LENGTH = 24


def _words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(3, 128)}" for _ in range(count))


@pytest.fixture(scope="module")
def workspace(family, tmp_path_factory) -> Path:
    """A recipe over the tiny family and two data files (a short and an empty document among them)."""
    root = tmp_path_factory.mktemp("compare")
    base, *fine_tunes = family
    recipe = {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(p)} for p in fine_tunes],
        "dtype": "float32",
    }
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe))
    hand = {**recipe, "merge_method": "task_arithmetic"}
    hand["models"] = [{"model": str(p), "parameters": {"weight": w}}
                      for p, w in zip(fine_tunes, (0.5, 0.3, 0.2))]  # fmt: skip
    (root / "hand.yml").write_text(yaml.safe_dump(hand))
    rng = random.Random(1)
    lines = [_words(rng, rng.randrange(2, 40)) for _ in range(30)] + ["w5"]
    (root / "a.txt").write_text("\n".join(lines[:15] + [""] + lines[15:]) + "\n")
    records = [{"text": _words(rng, rng.randrange(2, 20))} for _ in range(20)] + [{"text": ""}]
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _compare(workspace: Path, *args: str):
    return run_command("mergekit-nan", "compare", "recipe.yml", *args, cwd=workspace)


@pytest.fixture(scope="module")
def compared(workspace) -> Dict:
    """compare with four merged candidates (a half-split pick): its JSON and output."""
    result = _compare(
        workspace, "--data", "a.txt", "--data", "b.jsonl", "--exponent", "-1",
        "--granularity", "layer", "--lambda", "0.5", "--against", "hand.yml",
        "--max-length", str(MAX_LENGTH),
        "--seed", "3", "--bootstrap", "300", "--json", "out.json", "--csv", "out.csv", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {"json": json.loads((workspace / "out.json").read_text()), "stdout": result.stdout}


def _documents(path: Path) -> List[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return [line for line in path.read_text().splitlines() if line.strip()]


def _plain_losses(model_path: Path, tokenizer_path: Path, data: Path) -> DocumentLosses:
    """Each document's NLL sum over tokens 2..n, one document at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    sums, counts = [], []
    for text in _documents(data):
        ids = tokenizer(text)["input_ids"][:MAX_LENGTH]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        sums.append(-log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item())
        counts.append(len(ids) - 1)
    return DocumentLosses(torch.tensor(sums, dtype=torch.float64), torch.tensor(counts))


@pytest.fixture(scope="module")
def independent(compared, workspace, family) -> Dict[str, Dict[str, DocumentLosses]]:
    """Per candidate label and file: the document losses of the stock merge, scored plainly."""
    found = {}
    for number, candidate in enumerate(compared["json"]["candidates"]):
        out = workspace / "stock" / f"c{number}"
        recipe = candidate["recipe"]
        if (recipe.get("parameters") or {}).get("nan_granularity"):
            path = out.parent / f"c{number}.yml"
            out.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(recipe))
            run_command("mergekit-nan", "merge", str(path), str(out), "--no-copy-tokenizer",
                        "--no-write-model-card", check=True)  # fmt: skip
        else:
            run_mergekit_yaml(recipe, out)
        found[candidate["label"]] = {
            name: _plain_losses(out, family[0], workspace / name) for name in ("a.txt", "b.jsonl")
        }
    return found


def test_candidates_are_the_recipe_its_baseline_and_the_sweeps(compared, workspace):
    data = compared["json"]
    labels = [c["label"] for c in data["candidates"]]
    assert labels == [
        "nan",
        "uniform",
        "nan exponent=-1",
        "nan lambda=0.5",
        "nan granularity=layer",
        "hand.yml",
    ]
    assert data["candidates"][5]["recipe"] == yaml.safe_load((workspace / "hand.yml").read_text())
    assert data["baseline"] == "uniform"
    baseline = data["candidates"][1]["recipe"]
    assert baseline["merge_method"] == "task_arithmetic"
    assert [m["parameters"]["weight"] for m in baseline["models"]] == [pytest.approx(1 / 3)] * 3
    swept = data["candidates"][2]["recipe"]
    assert swept["parameters"] == {"nan_exponent": -1.0}
    assert data["candidates"][3]["recipe"]["parameters"] == {"lambda": 0.5}


def test_numbers_equal_stock_merges_scored_by_a_plain_loop(compared, independent):
    for candidate in compared["json"]["candidates"]:
        for name, reported in candidate["files"].items():
            plain = independent[candidate["label"]][name]
            assert reported["nll"] == pytest.approx(float(plain.loss()), rel=1e-6)
            assert reported["tokens"] == int(plain.tokens.sum())
            assert reported["documents"] == plain.tokens.numel()
            low, high = reported["ci95"]
            assert low < reported["nll"] < high
        base = compared["json"]["candidates"][1]["files"]
        for name, difference in candidate["vs_baseline"].items():
            expected = candidate["files"][name]["nll"] - base[name]["nll"]
            assert difference["diff"] == pytest.approx(expected, abs=1e-9)
    files = compared["json"]["candidates"][0]["files"]
    assert files["a.txt"]["skipped"] == 1 and files["b.jsonl"]["skipped"] == 1


def test_the_pick_is_chosen_on_one_half_and_reported_on_the_other(compared, independent):
    data = compared["json"]
    chosen = data["pick"]
    assert chosen["method"] == "half-split"
    selection = {name: torch.tensor(chosen["selection"][name]) for name in ("a.txt", "b.jsonl")}
    labels = [c["label"] for c in data["candidates"]]

    def pooled(label: str, halves: Dict[str, torch.Tensor]) -> float:
        parts = [independent[label][name].subset(rows) for name, rows in halves.items()]
        return sum(float(p.nll.sum()) for p in parts) / sum(int(p.tokens.sum()) for p in parts)

    best = min(labels, key=lambda label: pooled(label, selection))
    assert chosen["label"] == best
    for name, rows in selection.items():
        count = independent[best][name].tokens.numel()
        assert len(rows) == count // 2
        others = torch.tensor(sorted(set(range(count)) - set(rows.tolist())))
        report = {name: others}
        expected = pooled(best, report) - pooled("uniform", report)
        assert chosen["vs_baseline"][name]["diff"] == pytest.approx(expected, abs=1e-7)
    assert "the other half" in compared["stdout"]


def test_the_table_and_verdicts_are_printed_and_the_csv_holds_every_row(compared, workspace):
    out = compared["stdout"]
    assert "a.txt nats/token [95%]" in out and "overall" in out
    assert any(line.startswith(("no clear difference", compared["json"]["pick"]["label"]))
               for line in out.splitlines())  # fmt: skip
    rows = (workspace / "out.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 * 3  # header, then 6 candidates x (2 files + overall)


def test_the_bootstrap_is_deterministic_under_its_seed(workspace):
    runs = []
    for seed in ("5", "5", "6"):
        result = _compare(workspace, "--data", "a.txt", "--seed", seed, "--bootstrap", "200",
                          "--json", f"seed{seed}.json", "-q")  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs.append(json.loads((workspace / f"seed{seed}.json").read_text()))
    first, again, other = ([c["files"]["a.txt"]["ci95"] for c in run["candidates"]] for run in runs)
    assert first == again and first != other
    assert runs[0]["pick"]["method"] == "all documents" and runs[0]["pick"]["label"] == "nan"


def test_keep_writes_the_winner_as_the_stock_merge_of_its_recipe(workspace, tmp_path):
    result = _compare(workspace, "--data", "a.txt", "--bootstrap", "50", "--json",
                      str(tmp_path / "k.json"), "--keep", str(tmp_path / "kept"), "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "k.json").read_text())
    (winner,) = [c for c in data["candidates"] if c["label"] == data["winner"]]
    run_mergekit_yaml(winner["recipe"], tmp_path / "stock")
    kept, stock = load_model_tensors(tmp_path / "kept"), load_model_tensors(tmp_path / "stock")
    assert kept.keys() == stock.keys()
    assert all(torch.equal(kept[name], stock[name]) for name in kept)
    assert (tmp_path / "kept" / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_inputs_are_scored_alone_and_the_plot_is_written(workspace, family, tmp_path):
    result = _compare(workspace, "--data", "a.txt", "--inputs", "--bootstrap", "50",
                      "--max-length", str(MAX_LENGTH), "--json", str(tmp_path / "i.json"),
                      "--plot", str(tmp_path / "p.png"), "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "i.json").read_text())
    inputs = [c for c in data["candidates"] if c["kind"] == "input"]
    assert [c["model"] for c in inputs] == [str(p) for p in family]
    assert all("recipe" not in c for c in inputs)
    plain = _plain_losses(family[2], family[0], workspace / "a.txt")
    assert inputs[2]["files"]["a.txt"]["nll"] == pytest.approx(float(plain.loss()), rel=1e-6)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_table_formats_load_the_same_documents(tmp_path):
    import datasets

    texts = ["w3 w4 w5", "w6 w7", "w8"]
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "d.csv").write_text(
        "id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts))
    )
    table = datasets.Dataset.from_dict({"text": texts, "id": [0, 1, 2]})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for name in ("d.txt", "d.csv", "d.parquet", "saved"):
        assert [d.text for d in load_documents(str(tmp_path / name))] == texts, name
    sample = load_documents(str(tmp_path / "d.txt"), max_documents=2, seed=1)
    assert len(sample) == 2 and all(d.text in texts for d in sample)
    with pytest.raises(DataError, match="no 'text' column"):
        (tmp_path / "e.csv").write_text("body\nw3 w4\n")
        load_documents(str(tmp_path / "e.csv"))


def _model_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def broken(family, tmp_path_factory) -> Dict[str, Path]:
    """Models with no tokenizer, another tokenizer, and a non-causal architecture."""
    root = tmp_path_factory.mktemp("broken")
    found = {}
    found["untokenized"] = _model_copy(family[0], root / "untokenized")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (found["untokenized"] / name).unlink(missing_ok=True)
    found["retokenized"] = _model_copy(family[3], root / "retokenized")
    tokenizer = json.loads((found["retokenized"] / "tokenizer.json").read_text())
    vocabulary = tokenizer["model"]["vocab"]
    vocabulary["w3"], vocabulary["w4"] = vocabulary["w4"], vocabulary["w3"]
    (found["retokenized"] / "tokenizer.json").write_text(json.dumps(tokenizer))
    found["classifier"] = _model_copy(family[3], root / "classifier")
    config = json.loads((found["classifier"] / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (found["classifier"] / "config.json").write_text(json.dumps(config))
    return found


def _recipe(tmp_path: Path, base: Path, models: List[Path], **extra) -> str:
    write_recipe(tmp_path / "r.yml", build_recipe(models, base=base, **extra))
    return "r.yml"


BAD_DATA = {
    "missing": (None, "data file missing.txt not found"),
    "empty.txt": ("\n\n", "data file empty.txt holds no document"),
    "record.jsonl": ('{"text": "w3 w4"}\n{"body": "w5"}\n', "record.jsonl record 2 has no 'text'"),
    "json.jsonl": ('{"text": "w3 w4"}\n{oops\n', "json.jsonl record 2 is not JSON"),
    "chat.jsonl": ('{"messages": [{"role": "user", "content": "w3"}]}\n', "no chat template"),
    "short.txt": ("w3\nw4\n", "none of its 2 documents has 2 tokens"),
    "data.xml": ("<a/>", "unknown data file type '.xml'"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_error_naming_the_file_before_any_merge(name, family, tmp_path):
    content, message = BAD_DATA[name]
    data = name if content is not None else "missing.txt"
    if content is not None:
        (tmp_path / name).write_text(content)
    _bad(tmp_path, _recipe(tmp_path, family[0], family[1:]), ["--data", data], message)


def _bad(tmp_path: Path, recipe: str, args: List[str], message: str) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    result = run_command("mergekit-nan", "compare", recipe, *args, "--json", "o.json",
                         "--keep", "kept", "--work-dir", str(work), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Merging" not in result.stdout and "merging" not in result.stdout
    work.rmdir()  # empty: no merge was started
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return errors[0]


BAD_MODELS = {
    "untokenized": "has no tokenizer",
    "retokenized": "differ",
    "classifier": "LlamaForSequenceClassification, not a causal language model",
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_bad_models_are_one_error_naming_the_model(name, family, broken, tmp_path):
    (tmp_path / "a.txt").write_text("w3 w4 w5\n")
    model = broken[name]
    base, models = (
        (model, family[1:]) if name == "untokenized" else (family[0], [*family[1:3], model])
    )
    recipe = _recipe(tmp_path, base, models)
    error = _bad(tmp_path, recipe, ["--data", "a.txt"], BAD_MODELS[name])
    assert str(model) in error


BAD_OPTIONS = {
    "granularity": (["--granularity", "voxel"], "--granularity: 'voxel' is not one of"),
    "exponent": (["--exponent", "1,x"], "--exponent: 'x' is not a float"),
    "twice": (["--data", "a.txt"], "data file a.txt is given twice"),
    "recipe": (["--exponent", "1"], "nan_exponent"),
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_options_and_recipes_are_one_error(name, family, tmp_path):
    (tmp_path / "a.txt").write_text("w3 w4 w5\n")
    extra = {"parameters": {"nan_exponent": "steep"}} if name == "recipe" else {}
    recipe = _recipe(tmp_path, family[0], family[1:], **extra)
    args, message = BAD_OPTIONS[name]
    _bad(tmp_path, recipe, ["--data", "a.txt", *args], message)


def test_lambda_is_refused_for_a_method_without_it(family, tmp_path):
    (tmp_path / "a.txt").write_text("w3 w4 w5\n")
    recipe = {"merge_method": "linear+nan", "models": [{"model": str(p)} for p in family[1:]],
              "dtype": "float32"}  # fmt: skip
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    _bad(tmp_path, "r.yml", ["--data", "a.txt", "--lambda", "0.5"], "takes no lambda")


def test_keep_into_a_full_directory_is_refused(family, tmp_path):
    (tmp_path / "a.txt").write_text("w3 w4 w5\n")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("precious")
    _bad(tmp_path, _recipe(tmp_path, family[0], family[1:]), ["--data", "a.txt"], "not empty")
    assert (tmp_path / "kept" / "mine.txt").read_text() == "precious"


def test_ctrl_c_while_evaluating_leaves_no_model_and_no_file(workspace, tmp_path, monkeypatch):
    def interrupted(path, *args, **kwargs):
        assert Path(path).is_dir()  # the merged model exists while it is evaluated
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_score, "evaluate_model", interrupted)
    result = _compare(workspace, "--data", "a.txt", "--json", str(tmp_path / "o.json"),
                      "--work-dir", str(tmp_path), "-q")  # fmt: skip
    assert result.returncode == 130
    assert "Interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_chat_messages_are_rendered_with_the_chat_template(family, tmp_path):
    """A messages record is scored as the text the tokenizer's chat template renders."""
    from transformers import AutoTokenizer

    chatty = _model_copy(family[0], tmp_path / "chatty")
    config = json.loads((chatty / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} w9 {% endfor %}"
    (chatty / "tokenizer_config.json").write_text(json.dumps(config))
    rng = random.Random(2)
    records = [
        {"messages": [{"role": "user", "content": _words(rng, 5)},
                      {"role": "assistant", "content": _words(rng, 7)}]}
        for _ in range(6)
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = _recipe(tmp_path, chatty, family[1:])
    result = run_command("mergekit-nan", "compare", recipe, "--data", "chat.jsonl", "--inputs",
                         "--bootstrap", "20", "--json", "o.json", "-q", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    base = json.loads((tmp_path / "o.json").read_text())["candidates"][2]
    assert base["model"] == str(chatty)
    tokenizer = AutoTokenizer.from_pretrained(chatty)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    assert texts[0].count(" w9 ") == 2
    (tmp_path / "rendered.txt").write_text("\n".join(texts) + "\n")
    plain = _plain_losses(chatty, chatty, tmp_path / "rendered.txt")
    assert base["files"]["chat.jsonl"]["tokens"] == int(plain.tokens.sum())
    assert base["files"]["chat.jsonl"]["nll"] == pytest.approx(float(plain.loss()), rel=1e-6)
