"""lm-evaluation-harness on a local task (core/evaluation/harness.py): a real lm-eval run, offline,
of a five-item multiple-choice task on a tiny random GPT-NeoX model directory, checked against
the log-likelihoods computed here with the model itself; the errors naming the bad entry; the
config keys' checks."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from dollyflow.config import ConfigError, load_config  # noqa: E402
from dollyflow.core.evaluation.harness import KEY, hub_offline, is_path, run_harness, task_scores  # noqa: E402
from dollyflow.testing.harness_task import CHOICE_ITEMS, write_choice_task  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    """A tiny GPT-NeoX with random weights, saved as the train job saves a model (safetensors,
    the tokenizer with Dolly's tokens)."""
    from dollyflow.core.models.build import tiny_gpt_neox
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.testing.fixtures import save_model_dir
    tok = load_tokenizer(str(tokenizer_path))
    return str(save_model_dir(tiny_gpt_neox(len(tok), seed=3), tok, tmp_path_factory.mktemp("harness") / "model"))


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    return write_choice_task(tmp_path_factory.mktemp("tasks"), "dolly_choice")


def expected_acc(model_dir: str, items: list[dict]) -> float:
    """acc computed here: the share of items whose right choice has the highest summed
    log-likelihood after the prompt (lm-eval's multiple_choice: the choice after a space)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = []
        for choice in item["choices"]:
            ctx = tok(context)["input_ids"]
            whole = tok(context + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return right / len(items)


def test_a_local_task_runs_offline_scored_like_the_model_and_deterministic(model_dir, task_yaml):
    import huggingface_hub.constants as hub
    was = os.environ.get("HF_HUB_OFFLINE")
    first = run_harness(model_dir, [str(task_yaml)], device="cpu", batch_size=4, seed=5)
    assert first["offline"] is True and first["device"] == "cpu" and first["lm_eval_version"].startswith("0.4.")
    # the offline switches are put back
    assert os.environ.get("HF_HUB_OFFLINE") == was and hub.HF_HUB_OFFLINE == (was == "1")
    assert set(first["tasks"]) == {"dolly_choice"}
    scores = first["tasks"]["dolly_choice"]
    assert set(scores) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    assert scores["samples"] == len(CHOICE_ITEMS) == 5
    assert 0.0 <= scores["acc"] <= 1.0 and scores["acc"] * 5 == pytest.approx(round(scores["acc"] * 5))
    assert scores["acc"] == pytest.approx(expected_acc(model_dir, CHOICE_ITEMS))
    assert scores["acc_stderr"] is not None and scores["acc_stderr"] >= 0
    json.dumps(first, allow_nan=False)                # plain JSON

    again = run_harness(model_dir, [str(task_yaml)], device="cpu", batch_size=2, seed=5)
    assert again["tasks"] == first["tasks"]

    # limit: the first items only; a directory entry runs every task it defines
    other = write_choice_task(task_yaml.parent, "dolly_choice_b", CHOICE_ITEMS[:2])
    both = run_harness(model_dir, [str(task_yaml.parent)], device="cpu", limit=3)
    assert {t: s["samples"] for t, s in both["tasks"].items()} == {"dolly_choice": 3, "dolly_choice_b": 2}
    assert both["tasks"]["dolly_choice_b"]["acc"] == pytest.approx(expected_acc(model_dir, CHOICE_ITEMS[:2]))
    other.unlink()


def test_bad_entries_fail_naming_the_key_and_the_entry(model_dir, task_yaml, tmp_path):
    with pytest.raises(ConfigError, match=rf"{KEY}: the task file '{tmp_path}/nope.yaml' does not exist"):
        run_harness(model_dir, [str(task_yaml), str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match=rf"{KEY}: the directory .* holds no lm-eval task YAML"):
        run_harness(model_dir, [str(tmp_path)])
    # the data file named in the task is gone
    broken = write_choice_task(tmp_path / "broken", "dolly_broken")
    os.remove(broken.with_suffix(".jsonl"))
    with pytest.raises(ConfigError, match=rf"{KEY}: the task '{broken}' failed to load: .*offline"):
        run_harness(model_dir, [str(broken)])
    # a task file that names a hub dataset: refused offline, never a download attempt
    hub_task = tmp_path / "hub.yaml"
    hub_task.write_text(task_yaml.read_text().replace("dataset_path: json", "dataset_path: nyu-mll/glue")
                        .replace("task: dolly_choice", "task: from_hub"))
    with pytest.raises(ConfigError, match=r"failed to load: .*(Offline|offline).*data must be local files"):
        run_harness(model_dir, [str(hub_task)])
    # an unknown task name, with lm-eval's close names
    with pytest.raises(ConfigError, match=rf"{KEY}: unknown task 'hellaswagg'.*close: hellaswag"):
        run_harness(model_dir, [str(task_yaml), "hellaswagg"])


def test_entries_and_results_are_read_as_documented():
    assert is_path("tasks/x.yaml") and is_path("x.YML") and is_path("/abs/dir") and not is_path("hellaswag")
    results = {"results": {"g": {"alias": "g", "acc,none": 0.5, "acc_stderr,none": "N/A"},
                           "t1": {"alias": " - t1", "exact_match,strict-match": 1.0,
                                  "exact_match_stderr,strict-match": 0.0, "acc,none": float("nan")},
                           "t2": {"acc,none": 0.25, "acc_stderr,none": 0.1}},
               "group_subtasks": {"g": ["t1", "t2"]},
               "n-samples": {"t1": {"original": 10, "effective": 4}, "t2": {"original": 6, "effective": 6}}}
    assert task_scores(results) == {
        "g": {"acc": 0.5, "acc_stderr": None, "samples": 10},
        "t1": {"exact_match,strict-match": 1.0, "exact_match,strict-match_stderr": 0.0, "acc": None, "samples": 4},
        "t2": {"acc": 0.25, "acc_stderr": 0.1, "samples": 6}}


def test_hub_offline_is_scoped():
    import datasets.config
    import huggingface_hub.constants as hub
    before = (os.environ.get("HF_DATASETS_OFFLINE"), hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hub_offline(True):
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE is True
        assert datasets.config.HF_HUB_OFFLINE is True
    assert (os.environ.get("HF_DATASETS_OFFLINE"), hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before
    with hub_offline(False):
        assert hub.HF_HUB_OFFLINE == before[1]


@pytest.mark.parametrize("override, message", [
    ("evaluate.harness_limit=0", r"evaluate.harness_limit: must be >= 1 or null"),
    ("evaluate.harness_batch_size=0", r"evaluate.harness_batch_size: must be >= 1"),
    ("evaluate.harness_device=gpu", r"evaluate.harness_device: 'gpu' is not one of auto, cpu, cuda"),
    ("evaluate.harness_tasks=['']", r"evaluate.harness_tasks\[0\]"),
])
def test_bad_harness_settings_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("evaluate", [override])


def test_harness_settings_load():
    cfg = load_config("evaluate", ["evaluate.harness_tasks=[hellaswag, /tmp/t.yaml]", "evaluate.harness_limit=5",
                                   "evaluate.harness_device=cuda:1"])
    e = cfg.evaluate
    assert e.harness_tasks == ["hellaswag", "/tmp/t.yaml"] and e.harness_limit == 5
    assert e.harness_device == "cuda:1" and e.harness_batch_size == 8
    assert load_config("evaluate", []).evaluate.harness_tasks == []
