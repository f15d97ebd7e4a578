"""``mergekit-nan compare --task``: lm-eval tasks, against lm-eval itself and by hand.

Two local tasks over the tiny family's words: a multiple-choice task (which of
four continuations follows a context) and a generate-until exact-match task
(its answers are the base model's greedy next word, so merges get some right).
The independent side merges each candidate's recipe (read from compare's
``--json``) with the stock ``mergekit-yaml``, and gives lm-eval the model
directory to load itself; the multiple-choice accuracy is also computed here
from log-probabilities, and the statistics from the seeded draws.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from support import family_recipe, run_command, run_mergekit_yaml

from mergekit_nan.commands.compare import score as compare_score

SEED = 3
RESAMPLES = 200
LIMIT = 12  # of the 16 multiple-choice documents; the generate-until task has 10


def _words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(3, 128)}" for _ in range(count))


def _task_yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"
    )


MC_BODY = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GEN_BODY = """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _greedy_words(model_path: Path, questions: List[str]) -> List[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for question in questions:
            ids = tokenizer(question)["input_ids"]
            answers.append(
                tokenizer.decode([int(model(torch.tensor([ids])).logits[0, -1].argmax())])
            )
    return answers


@pytest.fixture(scope="module")
def workspace(family, tmp_path_factory) -> Path:
    """The recipe, a held-out file, mc.yaml (a task file) and tasks/gen.yaml (--include-path)."""
    root = tmp_path_factory.mktemp("compare-tasks")
    (root / "recipe.yml").write_text(yaml.safe_dump(family_recipe(family)))
    rng = random.Random(5)
    (root / "a.txt").write_text(
        "".join(_words(rng, rng.randrange(4, 20)) + "\n" for _ in range(12))
    )
    mc = [
        {"context": _words(rng, rng.randrange(3, 7)), "choices": [_words(rng, 2) for _ in range(4)],
         "gold": rng.randrange(4)}
        for _ in range(16)
    ]  # fmt: skip
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (root / "mc.yaml").write_text(_task_yaml("tiny_mc", root / "mc.jsonl", MC_BODY))
    questions = [_words(rng, rng.randrange(3, 7)) for _ in range(10)]
    answers = _greedy_words(family[0], questions)
    (root / "gen.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers))
    )
    (root / "tasks").mkdir()
    (root / "tasks" / "gen.yaml").write_text(_task_yaml("tiny_gen", root / "gen.jsonl", GEN_BODY))
    return root


@pytest.fixture(scope="module")
def compared(workspace) -> Dict:
    """compare with --data and two tasks over three merged candidates, merges and loads counted."""
    from transformers import AutoModelForCausalLM

    counts = {"merges": 0, "loads": 0, "from_pretrained": 0, "alive_at_merge": []}
    merge, load = compare_score.merge_candidate, compare_score.load_model
    from_pretrained = AutoModelForCausalLM.from_pretrained
    models: List[weakref.ref] = []

    def counted(key, function):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            if key == "merges":  # earlier candidates' models still in memory
                counts["alive_at_merge"].append(sum(m() is not None for m in models))
            result = function(*args, **kwargs)
            if key == "loads":
                models.append(weakref.ref(result))
            return result

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare_score, "merge_candidate", counted("merges", merge))
        patch.setattr(compare_score, "load_model", counted("loads", load))
        patch.setattr(
            AutoModelForCausalLM, "from_pretrained", counted("from_pretrained", from_pretrained)
        )
        result = run_command(
            "mergekit-nan", "compare", "recipe.yml", "--data", "a.txt", "--task", "mc.yaml",
            "--include-path", "tasks", "--task", "tiny_gen", "--limit", str(LIMIT),
            "--exponent", "-1", "--seed", str(SEED), "--bootstrap", str(RESAMPLES),
            "--json", "out.json", "--csv", "out.csv", "-q", cwd=workspace,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((workspace / "out.json").read_text())
    return {"json": data, "stdout": result.stdout, "counts": counts}


def _lm_eval_on_disk(model: Path, tokenizer: Path, workspace: Path, documents: Dict) -> Dict:
    """lm-eval's results and logged samples for the model directory, loaded by lm-eval."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), tokenizer=str(tokenizer), batch_size=8, device="cpu")
    manager = TaskManager(include_path=str(workspace / "tasks"), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=lm, tasks=[str(workspace / "mc.yaml"), "tiny_gen"], task_manager=manager,
        samples=documents, log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stock(compared, workspace, family) -> Dict[str, Dict]:
    """Per candidate label: its stock merge's directory and lm-eval's output on it."""
    documents = {name: t["documents"] for name, t in compared["json"]["tasks"].items()}
    found = {}
    for number, candidate in enumerate(compared["json"]["candidates"]):
        out = workspace / "stock" / f"c{number}"
        run_mergekit_yaml(candidate["recipe"], out)
        found[candidate["label"]] = {
            "path": out,
            "lm_eval": _lm_eval_on_disk(out, family[0], workspace, documents),
        }
    return found


def test_documents_are_a_seeded_sample_of_each_task(compared):
    tasks = compared["json"]["tasks"]
    assert tasks["tiny_mc"]["documents"] == sorted(random.Random(SEED).sample(range(16), LIMIT))
    assert tasks["tiny_gen"]["documents"] == list(range(10))
    assert tasks["tiny_mc"]["metric"] == "acc" and tasks["tiny_gen"]["metric"] == "exact_match"
    assert tasks["tiny_mc"]["total_documents"] == 16


def test_per_document_values_equal_lm_eval_on_the_stock_merge(compared, stock):
    for candidate in compared["json"]["candidates"]:
        reference = stock[candidate["label"]]["lm_eval"]
        for name, metric in (("tiny_mc", "acc"), ("tiny_gen", "exact_match")):
            mine = candidate["tasks"][name]
            samples = sorted(reference["samples"][name], key=lambda s: s["doc_id"])
            assert [s["doc_id"] for s in samples] == compared["json"]["tasks"][name]["documents"]
            assert mine["per_document"] == [float(s[metric]) for s in samples]
            assert mine["value"] == pytest.approx(reference["results"][name][f"{metric},none"])
            assert mine["documents"] == len(samples) and mine["higher_is_better"] is True
        norm = reference["results"]["tiny_mc"]["acc_norm,none"]
        assert candidate["tasks"]["tiny_mc"]["other_metrics"] == {"acc_norm": pytest.approx(norm)}
    gen = [c["tasks"]["tiny_gen"]["value"] for c in compared["json"]["candidates"]]
    assert all(0 < value for value in gen)  # the base's greedy words: merges get some right


def test_multiple_choice_accuracy_equals_summed_log_probabilities(compared, stock, workspace):
    """Each choice's log-probability summed over its tokens after the context; argmax; gold."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [json.loads(line) for line in (workspace / "mc.jsonl").read_text().splitlines()]
    documents = compared["json"]["tasks"]["tiny_mc"]["documents"]
    for candidate in compared["json"]["candidates"]:
        path = stock[candidate["label"]]["path"]
        tokenizer = AutoTokenizer.from_pretrained(compared["json"]["tokenizer"])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        correct = []
        for index in documents:
            record = records[index]
            context = tokenizer(record["context"])["input_ids"]
            scores = []
            for choice in record["choices"]:
                continuation = tokenizer(choice)["input_ids"]
                ids = torch.tensor([context + continuation])
                with torch.no_grad():
                    log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
                positions = range(len(context) - 1, len(context) + len(continuation) - 1)
                scores.append(sum(float(log_probs[p, ids[0, p + 1]]) for p in positions))
            correct.append(float(max(range(4), key=lambda i: scores[i]) == record["gold"]))
        assert candidate["tasks"]["tiny_mc"]["per_document"] == correct


def test_task_bootstrap_and_pick_equal_an_explicit_seeded_computation(compared):
    data = compared["json"]
    labels = [c["label"] for c in data["candidates"]]
    base = labels.index(data["baseline"])
    for t, name in enumerate(data["tasks"]):
        values = torch.tensor([c["tasks"][name]["per_document"] for c in data["candidates"]],
                              dtype=torch.float64)  # fmt: skip
        documents = values.shape[1]

        def generator(stream: int, task: int = t) -> torch.Generator:
            return torch.Generator().manual_seed((SEED * 7 + stream) * 100_003 + 1000 + task)

        drawn = torch.randint(documents, (RESAMPLES, documents), generator=generator(0))
        means = values[:, drawn].mean(dim=-1)
        for c, candidate in enumerate(data["candidates"]):
            quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
            expected = torch.quantile(means[c] - means[base], quantiles)
            assert candidate["vs_baseline_tasks"][name]["ci95"] == pytest.approx(expected.tolist())
            low, high = torch.quantile(means[c], quantiles).tolist()
            assert candidate["tasks"][name]["ci95"] == pytest.approx([low, high])
            diff = float(values[c].mean() - values[base].mean())
            assert candidate["vs_baseline_tasks"][name]["diff"] == pytest.approx(diff)
        order = torch.randperm(documents, generator=generator(1))
        selection = order[: documents // 2].sort().values
        report = order[documents // 2 :].sort().values
        pick = data["tasks"][name]["pick"]
        assert pick["method"] == "half-split" and pick["selection"] == selection.tolist()
        chosen = max(range(len(labels)), key=lambda c: (float(values[c, selection].mean()), -c))
        assert pick["label"] == labels[chosen]
        reported = float(values[chosen, report].mean() - values[base, report].mean())
        assert pick["vs_baseline"]["diff"] == pytest.approx(reported)


def test_each_model_is_freed_before_the_next_merge(compared):
    """lm-eval's wrapper and the model form a cycle; compare collects it, so models never pile
    up in memory (each merge starts with no earlier model alive)."""
    assert compared["counts"]["alive_at_merge"] == [0, 0, 0]


def test_data_and_tasks_together_merge_and_load_each_candidate_once(compared, workspace):
    data, counts = compared["json"], compared["counts"]
    assert [c["label"] for c in data["candidates"]] == ["nan", "uniform", "nan exponent=-1"]
    assert {k: counts[k] for k in ("merges", "loads", "from_pretrained")} == {
        "merges": 3,
        "loads": 3,
        "from_pretrained": 3,
    }
    for candidate in data["candidates"]:
        assert set(candidate["files"]) == {"a.txt"} and "vs_baseline_overall" in candidate
        assert (
            set(candidate["tasks"])
            == set(candidate["vs_baseline_tasks"])
            == {"tiny_mc", "tiny_gen"}
        )
    rows = (workspace / "out.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 4  # header, then 3 candidates x (file, overall, two tasks)
    assert rows[0].endswith("metric,value,higher_is_better")
    out = compared["stdout"]
    assert "tiny_mc acc [95%]" in out and "tiny_gen exact_match [95%]" in out
    assert "a.txt nats/token [95%]" in out and "tiny_mc acc_norm" in out
    last = out.strip().splitlines()[-3]  # then "Wrote out.json", "Wrote out.csv"
    assert last.startswith("Use ") and "in tiny_mc acc" in last
    assert data["decision"]["reason"] == last and data["decision"]["measure"] == "tiny_mc acc"


def _bad(tmp_path: Path, args: List[str], message: str, recipe: Dict) -> str:
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    before = sorted(p.name for p in tmp_path.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    result = run_command("mergekit-nan", "compare", "r.yml", *args, "--json", "o.json",
                         "--keep", "kept", "--work-dir", str(work), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "merging" not in result.stdout
    work.rmdir()  # empty: no merge was started
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return errors[0]


def _write_task(tmp_path: Path, name: str, data: str, body: str = MC_BODY) -> str:
    text = _task_yaml(name, Path(data), body)
    if not data.endswith(".jsonl"):  # a dataset on the Hub
        text = text.replace("dataset_path: json", f"dataset_path: {data}")
    (tmp_path / f"{name}.yaml").write_text(text)
    return f"{name}.yaml"


def test_bad_tasks_are_one_error_before_any_merge(family, workspace, tmp_path):
    recipe = family_recipe(family)
    missing = _write_task(tmp_path, "no_data", str(tmp_path / "absent.jsonl"))
    _bad(tmp_path, ["--task", missing], "--task no_data.yaml: its data files are missing", recipe)
    hub = _write_task(tmp_path, "on_the_hub", "someone/not-a-dataset")
    error = _bad(tmp_path, ["--task", hub], "its dataset cannot be reached offline", recipe)
    assert "dataset_path: json" in error
    task = str(workspace / "mc.yaml")
    error = _bad(tmp_path, ["--task", task, "--metric", "f1"], "--metric f1: task tiny_mc", recipe)
    assert "acc, acc_norm" in error
    _bad(tmp_path, [], "give held-out text (--data FILE), a benchmark task (--task NAME)", recipe)
    (tmp_path / "a.txt").write_text("w3 w4 w5\n")
    args = ["--data", "a.txt", "--limit", "5"]
    _bad(tmp_path, args, "--limit applies to --task, which is not given", recipe)


def test_an_unknown_task_names_the_nearest_lm_eval_knows(family, workspace, tmp_path):
    include = str(workspace / "tasks")
    error = _bad(tmp_path, ["--task", "tiny_gne", "--include-path", include],
                 "--task tiny_gne: lm-eval knows no task or group of that name", family_recipe(family))  # fmt: skip
    assert "(nearest: tiny_gen" in error


def test_without_lm_eval_the_error_names_the_extra(family, workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    error = _bad(tmp_path, ["--task", str(workspace / "mc.yaml")], "pip install 'mergekit-nan[tasks]'",
                 family_recipe(family))  # fmt: skip
    assert "lm-evaluation-harness" in error


def test_a_group_plans_each_subtask_and_scores_its_aggregate(family, workspace, tmp_path):
    """A group's subtasks are each a task; lm-eval's group aggregate is the size-weighted mean."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_nan.commands.compare.tasks import TaskSettings, plan_tasks, score_tasks

    for name in ("tiny_a", "tiny_b"):
        (tmp_path / f"{name}.yaml").write_text(_task_yaml(name, workspace / "mc.jsonl", MC_BODY))
    (tmp_path / "group.yaml").write_text(
        "group: tiny_group\ntask: [tiny_a, tiny_b]\naggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
    )
    settings = TaskSettings(("tiny_group",), include_path=str(tmp_path), limit=6)
    plan = plan_tasks(settings, seed=1)
    assert [t.name for t in plan.tasks] == ["tiny_a", "tiny_b"] and plan.groups == ("tiny_group",)
    assert all(t.group == "tiny_group" and len(t.documents) == 6 for t in plan.tasks)
    model = AutoModelForCausalLM.from_pretrained(family[2], dtype=torch.float32).eval()
    scores = score_tasks(model, AutoTokenizer.from_pretrained(family[0]), plan, quiet=True)
    assert scores.aggregates[0]["acc"] == pytest.approx(float(scores.values[0].mean()))
    pooled = float(torch.cat(scores.values).mean())
    assert scores.groups["tiny_group"]["acc"] == pytest.approx(pooled)


def test_compare_without_task_never_imports_lm_eval(workspace, monkeypatch):
    """lm-eval is imported only for --task: with every lm_eval module made unimportable, a
    --data run goes through (any import of it would raise ImportError), and a fresh
    interpreter that imports compare's modules has not imported it."""
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = run_command("mergekit-nan", "compare", "recipe.yml", "--data", "a.txt",
                         "--bootstrap", "20", "-q", cwd=workspace)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sys.modules["lm_eval"] is None
    modules = ("cli", "compare.run", "compare.score", "compare.task_summary", "compare.report")
    script = "".join(f"import mergekit_nan.commands.{m}\n" for m in modules)
    script += "import sys\nprint('lm_eval' in sys.modules)\n"
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "False", fresh.stderr
