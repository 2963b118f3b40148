"""The evaluate job's judge end to end (Spark, local[2]) with real judge models:

- a *scripted* judge: a tiny GPT-NeoX trained (:func:`dollyflow.testing.fixtures.tiny_dolly_model`)
  on the exact judge prompts of this test's rows, both orders, until it answers each with a
  chosen verdict ("A", "B", "tie", or "maybe", which is no verdict), so the job's generation,
  parsing, order combination, storage and aggregation are checked against known outcomes;
- a random tiny model, which answers garbage: every row is counted unparseable, nothing is guessed.

The predictions are written directly (two models, short answers), so the prompts the judge is
trained on are the ones the job builds."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import pytest

pytest.importorskip("torch")
pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

from dollyflow.core.evaluation.judge import judge_prompts  # noqa: E402
from dollyflow.core.models.files import model_digest  # noqa: E402

SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
PREDICTIONS_DDL = ("record_id string, model string, model_sha string, params_sha string, params string, "
                   "response string, finish_reason string, run_id string, created_at timestamp")
PARAMS_SHA = "00000000000000aa"

# record id, category, instruction, context, reference, answer of model A, answer of model B, what the judge says
# in the first order (A = model A's answer) and the second (A = model B's answer), and B's outcome
ROWS = [
    ("r1", "open_qa", "Name a primary colour.", "", "Red is a primary colour.", "Blue.", "Red.", "B", "A", "win"),
    ("r2", "open_qa", "What is the capital of France?", "", "Paris.", "Lyon.", "Paris.", "A", "B", "loss"),
    ("r3", "brainstorming", "Give me three fruits.", "", "Apple, pear and plum.", "Apple.", "Apple, pear, plum.",
     "A", "A", "tie"),     # a judge that always picks the first position: a tie, not a win
    ("r4", "closed_qa", "Who wrote Hamlet?", "Hamlet is a tragedy written around 1600.", "William Shakespeare.",
     "Marlowe.", "Shakespeare.", "tie", "tie", "tie"),
    ("r5", "creative_writing", "Write a haiku about rain.", "", "Soft rain on the roof", "Rain rain rain.",
     "Drops on the roof, soft.", "maybe", "B", "unparseable"),
    ("r6", "general_qa", "Is a whale a fish?", "", "No, a whale is a mammal.", "Yes.", "No.", "B", "A", "win"),
    ("r7", "open_qa", "Name a colour.", "", "  ", "Green.", "Purple.", "B", "A", "win"),   # empty reference
]
OUTCOME = {r[0]: r[9] for r in ROWS}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def scripted_records() -> list[dict]:
    """The judge's training set: both orders' prompts of every row (baseline mode), each answered
    with its scripted verdict."""
    out = []
    for rid, cat, ins, ctx, ref, a, b, first, second, _ in ROWS:
        p1, p2 = judge_prompts({"instruction": ins, "context": ctx, "response": ref}, a, b)
        out += [{"instruction": p.instruction, "context": p.context, "response": v} for p, v in ((p1, first),
                                                                                                (p2, second))]
    return out


@pytest.fixture(scope="module")
def scripted_judge(tmp_path_factory, tokenizer_path):
    from dollyflow.testing.fixtures import tiny_dolly_model
    return str(tiny_dolly_model(tmp_path_factory.mktemp("judge") / "scripted", tokenizer_path, scripted_records(),
                                steps=300, layers=3, max_position_embeddings=1024))


@pytest.fixture(scope="module")
def random_judge(tmp_path_factory, tokenizer_path):
    from dollyflow.core.models.build import tiny_gpt_neox
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.testing.fixtures import save_model_dir
    tok = load_tokenizer(str(tokenizer_path))
    return str(save_model_dir(tiny_gpt_neox(len(tok), seed=7), tok, tmp_path_factory.mktemp("judge") / "random"))


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory):
    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore

    root = tmp_path_factory.mktemp("evaluate-judge")
    base = [f"tables.warehouse={root / 'warehouse'}", "spark.shuffle_partitions=4", "evaluate.resamples=200",
            "evaluate.partitions=2", "evaluate.judge_window_rows=3"]
    cfg = load_config("evaluate", base)
    store = DeltaStore(spark, cfg.tables)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    silver = [(rid, ins, ctx, ref, cat, "sample", n, now, "test")
              for n, (rid, cat, ins, ctx, ref, *_rest) in enumerate(ROWS)]
    store.write(spark.createDataFrame(silver, SILVER_DDL), cfg.tables.silver, mode="overwrite")
    preds = []
    for name, col in (("model-a", 5), ("model-b", 6)):
        preds += [(r[0], name, _sha(name), PARAMS_SHA, '{"max_new_tokens":8}', r[col], "stop", f"infer-{name}", now)
                  for r in ROWS]
    store.write(spark.createDataFrame(preds, PREDICTIONS_DDL), cfg.tables.predictions, mode="overwrite")
    return {"base": base, "store": store}


def evaluate(spark, project, *overrides):
    from dollyflow.config import load_config
    from dollyflow.jobs import evaluate as job
    return job.run(load_config("evaluate", [*project["base"], *overrides]), spark)


def _records(store) -> dict:
    return {(r["record_id"], r["model"]): r.asDict() for r in store.read("eval_records").collect()}


@pytest.mark.spark
@pytest.mark.slow
def test_scripted_judge_verdicts_rates_headline_and_reruns(spark, project, scripted_judge):
    store = project["store"]
    both = "evaluate.models=[model-a, model-b]"
    out = evaluate(spark, project, both, f"evaluate.judge_model={scripted_judge}")
    judge_sha = model_digest(scripted_judge)
    assert out["judged"] == 7 and out["scored"] == 14
    j = out["judge"]
    assert j["against"] == "baseline" and j["baseline"] == "A" and j["sides"] == ["B"] and j["notes"] == []
    assert j["judge_sha"] == judge_sha and j["against_key"] == f"{_sha('model-a')}:{PARAMS_SHA}"
    # windows of 3 rows, one model load per Python worker
    assert j["workers"]["loads"] >= 1 and j["workers"]["loads_per_worker"] == 1 and j["workers"]["windows"] >= 3

    # eval_records: B's rows carry the verdicts and both raw answers; A's rows none
    rows = _records(store)
    for rid, cat, ins, ctx, ref, a, b, first, second, outcome in ROWS:
        rb, ra = rows[rid, "model-b"], rows[rid, "model-a"]
        assert (rb["judge_verdict"], rb["judge_first"], rb["judge_second"]) == (outcome, first, second), rid
        assert rb["judge_sha"] == judge_sha and rb["judge_against"] == j["against_key"] and rb["judge_error"] is None
        assert rb["judge_key"] and len(rb["judge_key"]) == 64
        assert all(ra[c] is None for c in ("judge_verdict", "judge_first", "judge_sha", "judge_key")), rid

    # rates: 3 wins, 2 ties, 1 loss among 6 parseable rows, 1 unparseable counted, not guessed
    rates = j["rates"]["B"]
    overall = rates["overall"]
    assert (overall["n"], overall["unparseable"], rates["judged"], rates["not_judged"]) == (6, 1, 7, 0)
    assert overall["win"]["mean"] == 0.5 and overall["loss"]["mean"] == pytest.approx(1 / 6, abs=1e-6)
    assert overall["tie"]["mean"] == pytest.approx(1 / 3, abs=1e-6)
    assert overall["score"]["mean"] == pytest.approx(4 / 6, abs=1e-6)
    assert overall["score"]["low"] <= overall["score"]["mean"] <= overall["score"]["high"]
    assert rates["by_category"]["open_qa"]["n"] == 3 and rates["by_category"]["open_qa"]["win"]["mean"] == pytest.approx(2 / 3, abs=1e-6)
    assert rates["by_category"]["creative_writing"] ["n"] == 0
    assert rates["by_category"]["creative_writing"]["unparseable"] == 1
    assert rates["by_category"]["creative_writing"]["score"]["mean"] is None
    assert j["unparseable"] == {"B": 1}

    # the headline: the judge score for the open-ended categories (A, the baseline, ties itself)
    head = out["headline"]
    assert head["open_qa"]["metric"] == "judge_score" and head["closed_qa"]["metric"] == "token_f1"
    assert head["open_qa"]["sides"]["B"]["mean"] == pytest.approx(2 / 3, abs=1e-6)
    assert head["open_qa"]["sides"]["A"]["mean"] == 0.5
    assert head["open_qa"]["diff"]["B - A"]["diff"] == pytest.approx(2 / 3 - 0.5, abs=1e-6)
    assert head["creative_writing"]["sides"]["B"]["mean"] is None     # its only row is unparseable
    assert "judge score" in out["headline_note"]
    assert out["parameters"]["judge"]["judge_sha"] == judge_sha

    # eval_runs.judge holds the same
    run = [r for r in store.read("eval_runs").collect() if r["run_id"] == out["run_id"]][0]
    assert json.loads(run["judge"])["rates"] == json.loads(json.dumps(j["rates"]))

    from dollyflow.summaries import human_line
    line = human_line("evaluate", out, {"eval_records": [0, 1]})
    assert "judge B vs A: win 0.5" in line and "1 unparseable" in line and "\n" not in line

    # the same inputs again: nothing judged, nothing written, the same figures
    version = store.version("eval_records")
    again = evaluate(spark, project, both, f"evaluate.judge_model={scripted_judge}")
    assert again["judged"] == again["scored"] == 0 and "unchanged" in again["written"]
    assert store.version("eval_records") == version
    assert again["judge"]["rates"] == j["rates"] and again["headline"] == out["headline"]
    assert again["fingerprint"] == out["fingerprint"]

    # without the judge: nothing written, the stored verdicts stay, the headline falls back to ROUGE-L
    plain = evaluate(spark, project, both)
    assert plain["judge"] is None and plain["judged"] == 0 and store.version("eval_records") == version
    assert plain["headline"]["open_qa"]["metric"] == "rougeL" and plain["fingerprint"] != out["fingerprint"]

    # against the reference: every side judged again (the rows with an empty reference are not), columns updated
    ref = evaluate(spark, project, both, f"evaluate.judge_model={scripted_judge}", "evaluate.judge_against=reference")
    assert ref["judged"] == 12 and ref["scored"] == 0 and store.version("eval_records") == version + 1
    assert ref["judge"]["sides"] == ["A", "B"] and ref["judge"]["not_judged"] == {
        "A": {"empty_reference": 1}, "B": {"empty_reference": 1}}
    rows = _records(store)
    for rid, *_ in ROWS:
        for model in ("model-a", "model-b"):
            r = rows[rid, model]
            if rid == "r7":   # not judged against an empty reference; B keeps its baseline verdict
                assert r["judge_against"] == (None if model == "model-a" else j["against_key"])
            else:
                assert r["judge_against"] == "reference" and r["judge_verdict"] in ("win", "tie", "loss", "unparseable")
    assert ref["judge"]["rates"]["A"]["judged"] == ref["judge"]["rates"]["B"]["judged"] == 6

    # and back to the baseline: B's verdicts are the scripted ones again
    back = evaluate(spark, project, both, f"evaluate.judge_model={scripted_judge}")
    assert back["judged"] == 6 and back["judge"]["rates"] == j["rates"]
    assert {rid: r["judge_verdict"] for (rid, m), r in _records(store).items() if m == "model-b"} == OUTCOME


@pytest.mark.spark
@pytest.mark.slow
def test_a_judge_answering_garbage_is_counted_unparseable_and_one_side_falls_back(spark, project, random_judge):
    out = evaluate(spark, project, "evaluate.models=[model-a, model-b]", f"evaluate.judge_model={random_judge}",
                   "evaluate.judge_max_new_tokens=6")
    rates = out["judge"]["rates"]["B"]
    assert out["judged"] == 7 and rates["overall"]["n"] == 0 and rates["overall"]["unparseable"] == 7
    assert rates["overall"]["win"]["mean"] is None and rates["overall"]["score"]["low"] is None
    assert any("none of the 7 judged rows got a parseable verdict" in n for n in out["judge"]["notes"])
    assert out["headline"]["open_qa"]["sides"]["B"]["mean"] is None
    b_rows = [r for (rid, m), r in _records(project["store"]).items() if m == "model-b"]
    assert all(r["judge_verdict"] == "unparseable" and r["judge_first"] for r in b_rows)
    from dollyflow.summaries import human_line
    assert "judge B vs A: no parseable verdict, 7 unparseable" in human_line("evaluate", out, {})

    # one side: baseline has nothing to compare with, so the side is judged against the reference, and it says so
    one = evaluate(spark, project, "evaluate.models=[model-b]", f"evaluate.judge_model={random_judge}",
                   "evaluate.judge_max_new_tokens=6")
    assert one["judge"]["against"] == "reference" and one["judge"]["requested"] == "baseline"
    assert "only side A is compared" in one["judge"]["notes"][0]
    assert one["judge"]["not_judged"] == {"A": {"empty_reference": 1}}


@pytest.mark.spark
def test_a_judge_that_cannot_judge_fails_naming_the_key(spark, project, tmp_path, tokenizer_path):
    with pytest.raises(RuntimeError, match=r"evaluate.judge_model='/no/such/judge'.*does not exist"):
        evaluate(spark, project, "evaluate.models=[model-a, model-b]", "evaluate.judge_model=/no/such/judge")
    # a causal LM without Dolly's prompt tokens
    from transformers import AutoTokenizer

    from dollyflow.core.models.build import tiny_gpt_neox
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    plain = tmp_path / "plain"
    tiny_gpt_neox(len(tok)).save_pretrained(str(plain))
    tok.save_pretrained(str(plain))
    with pytest.raises(ValueError, match=r"evaluate.judge_model=.*cannot judge.*special tokens"):
        evaluate(spark, project, "evaluate.models=[model-a, model-b]", f"evaluate.judge_model={plain}")


@pytest.mark.slow
def test_the_judge_function_windows_rows_with_one_load(scripted_judge, monkeypatch):
    """The mapInPandas function alone (no Spark): 7 rows in frames of 2, windows of 3, both
    orders generated by the real Generator, the outcomes the script says."""
    import pandas as pd

    from dollyflow.config import EvaluateConfig
    from dollyflow.engine.evaluate import Side
    from dollyflow.engine.infer import LoadCounts
    from dollyflow.engine.judge import judge_function, resolve_judge

    sides = [Side(label, f"model-{label.lower()}", _sha(f"model-{label.lower()}"), PARAMS_SHA, "", 7, "")
             for label in "AB"]
    judge = resolve_judge(EvaluateConfig(judge_model=scripted_judge, judge_window_rows=3), sides)
    assert judge.spec.window_rows == 3 and judge.spec.params.max_new_tokens == 16 and not judge.spec.params.do_sample

    class Counter(LoadCounts):
        def __init__(self):
            self.value = {}

        def add(self, d):
            self.addInPlace(self.value, d)

    frame = pd.DataFrame([{"record_id": r[0], "model_sha": _sha("model-b"), "params_sha": PARAMS_SHA,
                           "silver_version": 0, "instruction": r[2], "context": r[3], "reference": r[4],
                           "answer_1": r[5], "answer_2": r[6], "judge_key": f"k{r[0]}"} for r in ROWS])
    counter = Counter()
    out = list(judge_function(judge.spec, counter)(iter([frame.iloc[i:i + 2] for i in range(0, 7, 2)])))
    assert [len(f) for f in out] == [3, 3, 1]
    got = pd.concat(out)
    assert dict(zip(got["record_id"], got["judge_verdict"])) == OUTCOME
    assert list(got["judge_key"]) == [f"k{r[0]}" for r in ROWS]
    events = {}
    for (event, _), n in counter.value.items():
        events[event] = events.get(event, 0) + n
    assert events["window"] == 3 and events.get("load", 0) <= 1    # the worker cache may hold it already


def test_judge_settings_are_validated_naming_the_key():
    from dollyflow.config import ConfigError, load_config
    for override, key in (("evaluate.judge_against=nobody", "evaluate.judge_against"),
                          ("evaluate.judge_max_new_tokens=0", "evaluate.judge_max_new_tokens"),
                          ("evaluate.judge_window_rows=0", "evaluate.judge_window_rows"),
                          ("evaluate.judge_device=tpu", "evaluate.judge_device"),
                          ("evaluate.judge_dtype=int4", "evaluate.judge_dtype")):
        with pytest.raises(ConfigError, match=key):
            load_config("evaluate", [override])
