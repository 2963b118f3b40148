"""Any decoder-only causal LM through every job: tiny random GPT-NeoX, Llama, Qwen2 and Mistral models
(built from their configs) with test tokenizers given a chat template, each in both prompt formats:
tokenize (Spark) -> train (full and LoRA, one CPU rank in this process) -> the infer job -> ``dolly_generate``
from SQL. Greedy answers equal transformers' ``generate``; the labels are exactly the assistant's tokens
and its end-of-turn token; the model directory reloads with transformers alone and records its format,
which infer and the SQL function pick up without any setting."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from dollyflow.config import load_config  # noqa: E402
from dollyflow.core.records import record_id  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.slow]

SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
#: architecture -> (tiny preset, the chat template style of its test tokenizer)
ARCHS = {"gpt_neox": ("tiny", "chatml"), "llama": ("tiny-llama", "llama3"), "qwen2": ("tiny-qwen2", "chatml"),
         "mistral": ("tiny-mistral", "mistral")}
#: the end-of-turn token of each template style
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "<|endoftext|>"}
MAX_NEW = 8
TEST_ROWS = 6


@pytest.fixture(scope="module", params=list(ARCHS))
def pipeline(request, spark, tmp_path_factory, tokenizer_path, dolly_records):
    """Per architecture, per prompt format: a silver table of 40 short records, the tokenize job, a full
    and a LoRA fine-tune of a few steps, and the infer job on the full one."""
    from dollyflow.core.training.loop import train_main
    from dollyflow.core.training.prepare import finish, prepare
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.jobs import infer, tokenize
    from dollyflow.testing.fixtures import chat_tokenizer

    arch = request.param
    preset, style = ARCHS[arch]
    root = tmp_path_factory.mktemp(f"models-{arch}")
    tok_dir = chat_tokenizer(tokenizer_path, root / "tokenizer", style)
    short = sorted(dolly_records, key=lambda r: len(r["response"]))[:40]
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [(record_id(r["instruction"], r["context"], r["response"], r["category"]), r["instruction"],
             r["context"], r["response"], r["category"], "sample", n, now, "test") for n, r in enumerate(short, 1)]
    out = {"arch": arch, "style": style, "tok_dir": tok_dir, "records": short}
    for fmt in ("dolly", "chat_template"):
        wh = f"tables.warehouse={root / fmt / 'warehouse'}"
        system = ["prompt.system=Answer briefly."] if fmt == "chat_template" and style != "mistral" else []
        cfg = load_config("tokenize", [wh, "spark.shuffle_partitions=2", f"model.tokenizer={tok_dir}",
                                       "tokenize.test_size=6", "tokenize.num_shards=1", f"prompt.format={fmt}",
                                       "tokenize.source_table=silver",
                                       *system], preset=preset)
        store = DeltaStore(spark, cfg.tables)
        store.write(spark.createDataFrame(rows, SILVER_DDL), cfg.tables.silver, mode="overwrite", job="test",
                    run_id="test")
        tok_summary = tokenize.run(cfg, spark)
        models = {}
        for method in ("full", "lora"):
            tcfg = load_config("train", [wh, f"model.tokenizer={tok_dir}", "train.processes=1", "train.mlflow=false",
                                         "train.max_steps=6", "train.eval_steps=1000", "train.save_steps=1000",
                                         "train.progress=log", f"train.method={method}",
                                         f"train.output_dir={root / fmt / method}"], preset=preset)
            plan = prepare(tcfg)
            assert plan["decision"] == "fresh"
            finish(plan, train_main(plan["spec"]))
            models[method] = str(root / fmt / method)
        args = [wh, "spark.shuffle_partitions=2", f"infer.model={models['full']}", f"infer.max_new_tokens={MAX_NEW}"]
        inferred = infer.run(load_config("infer", args), spark)
        out[fmt] = {"wh": wh, "tokenize": tok_summary, "models": models, "infer": inferred,
                    "predictions": {r["record_id"]: r for r in store.read("predictions").collect()},
                    "shard_dir": tok_summary["shard_dir"]}
    return out


def stop_ids(model, tok) -> list[int]:
    """generation_config.json's eos ids and the tokenizer's eos (where the generator stops)."""
    eos = model.generation_config.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id})


def _hf_greedy(model_dir, prompts_rows):
    """transformers alone: the directory's model, tokenizer, template and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prov = json.load(open(os.path.join(model_dir, "dollyflow_model.json")))
    outs = []
    for ins, ctx in prompts_rows:
        if prov["prompt"]["format"] == "chat_template":
            msgs = [{"role": "system", "content": prov["prompt"]["system"]}] if prov["prompt"]["system"] else []
            msgs.append({"role": "user", "content": f"{ins}\n\nInput:\n{ctx}" if ctx else ins})
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        else:
            from dollyflow.core.prompt import format_inference_prompt
            ids = tok(format_inference_prompt(ins, ctx), return_tensors="pt")
        gen = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=stop_ids(model, tok))
        outs.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return tok, model, outs


@pytest.mark.parametrize("fmt", ["dolly", "chat_template"])
def test_labels_are_exactly_the_assistant_turn(pipeline, fmt):
    from dollyflow.core.shards import read_manifest
    from dollyflow.core.training.data import split_records
    from dollyflow.core.tokens import load_tokenizer

    shard_dir = pipeline[fmt]["shard_dir"]
    manifest = read_manifest(shard_dir)
    assert manifest["prompt"]["format"] == fmt and manifest["prompt_format"] == fmt
    tok = load_tokenizer(os.path.join(shard_dir, "tokenizer"), dolly_tokens=False)
    base = load_tokenizer(str(pipeline["tok_dir"]), dolly_tokens=False)
    assert (len(tok) == len(base)) == (fmt == "chat_template")       # no token added in the chat format
    by_id = {record_id(r["instruction"], r["context"], r["response"], r["category"]): r for r in pipeline["records"]}
    rec = split_records(shard_dir, "train")
    assert len(rec) > 20
    for j in range(len(rec)):
        ids, start, r = [int(x) for x in rec.ids(j)], int(rec.response_start[j]), by_id[rec.record_id[j]]
        labels = rec.batch([j], tok.pad_token_id)["labels"][0].tolist()     # right padded to a multiple of 8
        assert labels == [-100] * start + ids[start:] + [-100] * (len(labels) - len(ids))
        if fmt == "dolly":
            assert tok.convert_ids_to_tokens(ids[start - 1]) == "### Response:\n"
            assert tok.convert_ids_to_tokens(ids[-1]) == "### End"
            continue
        # the ids before the labels are exactly transformers' own generation prompt of that record
        sys_msgs = [] if pipeline["style"] == "mistral" else [{"role": "system", "content": "Answer briefly."}]
        user = f"{r['instruction']}\n\nInput:\n{r['context']}" if r["context"] else r["instruction"]
        want = tok.apply_chat_template(sys_msgs + [{"role": "user", "content": user}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
        assert ids[:start] == list(want)
        # the labels: the response's tokens and one end-of-turn token, nothing after it
        eot = tok.convert_tokens_to_ids(END_OF_TURN[pipeline["style"]])
        assert ids[-1] == eot and eot not in ids[start:-1]
        assert tok.decode(ids[start:-1]).strip() == r["response"].strip()


@pytest.mark.parametrize("fmt", ["dolly", "chat_template"])
def test_infer_job_answers_equal_transformers_generate_and_the_dir_reloads(pipeline, fmt):
    p = pipeline[fmt]
    inferred = p["infer"]
    assert inferred["rows_in"] == TEST_ROWS and inferred["generated"] == TEST_ROWS
    preds = list(p["predictions"].values())
    assert len(preds) == TEST_ROWS and not any(r["error"] for r in preds)
    full = p["models"]["full"]
    prov = json.load(open(os.path.join(full, "dollyflow_model.json")))
    assert prov["prompt"]["format"] == fmt
    # the model directory with transformers alone: greedy tokens equal the job's
    by_id = {record_id(r["instruction"], r["context"], r["response"], r["category"]): r for r in pipeline["records"]}
    tok, model, hf = _hf_greedy(full, [(by_id[r["record_id"]]["instruction"], by_id[r["record_id"]]["context"])
                                       for r in preds])
    arch = pipeline["arch"]
    assert model.config.model_type == arch
    for r, want in zip(preds, hf):
        stop = set(stop_ids(model, tok))
        body = want[:-1] if want and want[-1] in stop else want
        assert r["completion_tokens"] == len(want), (arch, fmt, r["response"], tok.decode(want))
        assert r["response"] == tok.decode(body).strip()
        assert r["finish_reason"] == ("stop" if len(want) < MAX_NEW or want[-1] in stop else "length")
    if fmt == "chat_template":
        eot = tok.convert_tokens_to_ids(END_OF_TURN[pipeline["style"]])
        assert eot in (model.generation_config.eos_token_id or [])


@pytest.mark.parametrize("fmt", ["dolly", "chat_template"])
def test_dolly_generate_sql_serves_the_lora_model_in_its_format(pipeline, fmt, spark):
    from dollyflow.core.generation.generator import Generator
    from dollyflow.core.generation.params import GenerationParams
    from dollyflow.core.models.loading import load_for_generation, prompt_format_of
    from dollyflow.engine.infer import register_udf

    p = pipeline[fmt]
    lora = p["models"]["lora"]
    prov = json.load(open(os.path.join(lora, "dollyflow_model.json")))
    assert prov["method"] == "lora" and prov["weights"] == "merged" and prov["prompt"]["format"] == fmt
    cfg = load_config("infer", [p["wh"], f"infer.model={lora}", f"infer.max_new_tokens={MAX_NEW}"])
    register_udf(spark, cfg)
    recs = pipeline["records"][:4]
    spark.createDataFrame([(i, r["instruction"], r["context"]) for i, r in enumerate(recs)],
                          "id int, instruction string, context string").createOrReplaceTempView("prompts_models")
    got = {r["id"]: r for r in spark.sql("SELECT id, g.response, g.completion_tokens, g.error FROM (SELECT id, "
                                         "dolly_generate(instruction, context) AS g FROM prompts_models)").collect()}
    model, tok = load_for_generation(lora)
    fmt_obj = prompt_format_of(lora, tok)
    assert fmt_obj.name == fmt
    want = Generator(model, tok, GenerationParams(max_new_tokens=MAX_NEW), prompt_format=fmt_obj).generate(
        [r["instruction"] for r in recs], [r["context"] for r in recs])
    for i, w in enumerate(want):
        assert got[i]["error"] is None and (got[i]["response"], got[i]["completion_tokens"]) == \
            (w.response, w.completion_tokens)
