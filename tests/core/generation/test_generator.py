"""The batched generator: Dolly prompts, the decode loop with continuous batching, stopping,
sampling seeds across batches, bad rows. A tiny GPT-NeoX trained to answer two sample records
(conftest ``dolly_model_dir``), fp32 on CPU."""
from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.generation.batch import Prompt  # noqa: E402
from dollyflow.core.generation.generator import Generator  # noqa: E402
from dollyflow.core.generation.params import (ERROR_EMPTY_INSTRUCTION, FINISH_ERROR, FINISH_LENGTH,  # noqa: E402
                                              FINISH_STOP, GenerationParams)
from dollyflow.core.models.device import pick_device, pick_dtype  # noqa: E402
from dollyflow.core.models.loading import check_dolly_tokenizer, load_for_generation, stop_token_ids  # noqa: E402
from dollyflow.core.prompt import END_KEY, format_inference_prompt  # noqa: E402
from dollyflow.core.tokens import load_tokenizer  # noqa: E402

MEMORISED = (1, 3)   # conftest DOLLY_FIXTURE_RECORDS


def gen(loaded, **kw):
    model, tok = loaded
    batching = {k: kw.pop(k) for k in ("batch_tokens", "max_batch_size", "max_positions", "fast") if k in kw}
    return Generator(model, tok, GenerationParams(**kw), **batching)


def run(g, rows, seeds=None):
    return g.generate([r["instruction"] for r in rows], [r["context"] for r in rows], seeds)


def hf_greedy(loaded, stop_ids, instruction, context, max_new_tokens):
    model, tok = loaded
    enc = tok(format_inference_prompt(instruction, context), return_tensors="pt").to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=tok.eos_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_the_model_directory_follows_the_train_contract(dolly_model_dir, loaded):
    names = {p.name for p in dolly_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "dollyflow_model.json"} <= names
    model, tok = loaded
    end = tok.convert_tokens_to_ids(END_KEY)
    assert stop_token_ids(model, tok) == sorted({end, tok.eos_token_id})
    assert tok.pad_token_id == tok.eos_token_id
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_greedy_equals_transformers_generate_whatever_the_batch(loaded, rows):
    """The hand-written loop (left padding, position ids, KV cache, rows leaving the batch, rows
    joining a running batch) gives exactly transformers' greedy tokens, in one batch, one row at
    a time, or five rows at a time with refills; through the GPT-NeoX decode step
    (neox_step.py) and through the model's own forward."""
    runs = {}
    for fast in (True, False):
        g = gen(loaded, max_new_tokens=12, fast=fast)
        assert (g._step is not None) == fast
        batched = run(g, rows)
        single = run(gen(loaded, max_new_tokens=12, max_batch_size=1, fast=fast), rows)
        refilled = gen(loaded, max_new_tokens=12, max_batch_size=5, fast=fast)    # rows join a running batch
        merged = run(refilled, rows)
        assert refilled.prefills > len(rows) // 5
        assert g.retried == refilled.retried == 0    # no batch failed (its rows would be retried alone)
        runs[fast] = (batched, single, merged)
    for i, r in enumerate(rows):
        ref = hf_greedy(loaded, g.stop_ids, r["instruction"], r["context"], 12)
        assert all(side[i].token_ids == ref for sides in runs.values() for side in sides)
    assert any(a.finish_reason == FINISH_STOP for a in runs[True][0])


def test_stops_at_end_and_extracts_the_response(loaded, dolly_records):
    model, tok = loaded
    end = tok.convert_tokens_to_ids(END_KEY)
    recs = [dolly_records[i] for i in MEMORISED]
    out = run(gen(loaded, max_new_tokens=64), recs)
    for r, o in zip(recs, out):
        assert o.finish_reason == FINISH_STOP and o.error is None
        assert o.token_ids[-1] == end                      # stopped on "### End" ...
        assert o.response == r["response"].strip()         # ... which is not part of the response
        assert o.completion_tokens == len(o.token_ids)
        assert o.prompt_tokens == len(tok(format_inference_prompt(r["instruction"], r["context"]))["input_ids"])
    # a limit shorter than the answer: finish_reason length, the response is what was generated
    short = run(gen(loaded, max_new_tokens=2), recs[1:])[0]
    assert short.finish_reason == FINISH_LENGTH and short.completion_tokens == 2
    assert short.response == tok.decode(short.token_ids).strip()
    assert out[1].response.startswith(short.response)


def test_rows_finish_independently_and_batches_respect_the_token_budget(loaded, dolly_records):
    """Short answers leave the batch while a long one goes on; a small token budget makes more,
    smaller batches and the same tokens."""
    mixed = [dolly_records[1], dolly_records[3], dolly_records[0], dolly_records[5]]
    wide = gen(loaded, max_new_tokens=40)
    a = run(wide, mixed)
    narrow = gen(loaded, max_new_tokens=40, batch_tokens=300)
    b = run(narrow, mixed)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert wide.prefills == 1 and narrow.prefills > 1
    lengths = [len(x.token_ids) for x in a]
    assert len(set(lengths)) > 1   # rows really finished at different steps in one batch


def test_admission_respects_the_token_budget(loaded):
    from collections import deque

    g = gen(loaded, max_new_tokens=20, batch_tokens=400, max_batch_size=3)
    queue = deque(Prompt(i, [1] * n, 0) for i, n in enumerate([300, 200, 50, 40, 10, 5]))
    assert [p.index for p in g._admit(queue, 0, 0)] == [0]          # 320 tokens: alone
    assert [p.index for p in g._admit(queue, 0, 0)] == [1]          # 2 x 220 > 400
    assert [p.index for p in g._admit(queue, 0, 0)] == [2, 3, 4]    # 3 x 70 <= 400, at most 3 rows
    assert [p.index for p in g._admit(queue, 2, 150)] == []         # 3 x 170 > 400 beside a running batch
    assert [p.index for p in g._admit(queue, 1, 150)] == [5]


def test_seeded_sampling_is_reproducible_across_batches_and_order(loaded, rows):
    params = dict(max_new_tokens=10, do_sample=True, top_p=0.92, top_k=0, temperature=1.0, seed=7)
    rows = rows[:12]
    a = run(gen(loaded, **params), rows)
    b = run(gen(loaded, **params, max_batch_size=1), rows)
    c = run(gen(loaded, **params, batch_tokens=700), rows[::-1])[::-1]
    assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in c]
    other = run(gen(loaded, **{**params, "seed": 8}), rows)
    assert [x.token_ids for x in other] != [x.token_ids for x in a]
    # explicit per-row seeds win over the derived ones, and only the row's own seed matters
    seeds = list(range(100, 100 + len(rows)))
    d = run(gen(loaded, **params), rows, seeds)
    e = run(gen(loaded, **params, max_batch_size=3), rows[:5], seeds[:5])
    assert [x.token_ids for x in d[:5]] == [x.token_ids for x in e]


def test_sampling_filters_reduce_to_greedy_at_their_limits(loaded, rows):
    greedy = [x.token_ids for x in run(gen(loaded, max_new_tokens=8), rows[:6])]
    top1 = run(gen(loaded, max_new_tokens=8, do_sample=True, top_k=1, top_p=1.0), rows[:6])
    tiny_p = run(gen(loaded, max_new_tokens=8, do_sample=True, top_p=1e-6), rows[:6])
    assert [x.token_ids for x in top1] == greedy == [x.token_ids for x in tiny_p]


def test_bad_rows_get_errors_and_the_others_their_answers(loaded, dolly_records):
    """Null/blank instruction, a context too long (trimmed from the left) and a prompt too long
    even without context (error) -- while every other row answers exactly as in a clean run."""
    model, tok = loaded
    good = [dolly_records[i] for i in (0, 1, 3)]
    clean = run(gen(loaded, max_new_tokens=16, max_positions=256), good)
    long_context = " ".join(f"word{i}" for i in range(400)) + " The passage ends here."
    huge_instruction = " ".join(f"ask{i}" for i in range(400))
    instructions = [None, good[0]["instruction"], "   ", good[1]["instruction"], "Summarise.", huge_instruction,
                    good[2]["instruction"]]
    contexts = [None, good[0]["context"], "", good[1]["context"], long_context, "", good[2]["context"]]
    g = gen(loaded, max_new_tokens=16, max_positions=256)
    out = g.generate(instructions, contexts)
    assert [o.finish_reason == FINISH_ERROR for o in out] == [True, False, True, False, False, True, False]
    assert out[0].error == ERROR_EMPTY_INSTRUCTION and out[2].error == ERROR_EMPTY_INSTRUCTION
    assert out[0].response is None and out[0].completion_tokens is None
    assert [o.token_ids for o in (out[1], out[3], out[6])] == [c.token_ids for c in clean]
    trimmed = out[4]
    assert trimmed.error is None and trimmed.trimmed_context_tokens > 0
    assert trimmed.prompt_tokens <= 256 - 16
    # the end of the passage is what was kept
    full = len(tok(format_inference_prompt("Summarise.", long_context))["input_ids"])
    ids, dropped, _ = g._fitter.fit("Summarise.", long_context, full)
    assert dropped == trimmed.trimmed_context_tokens and len(ids) == trimmed.prompt_tokens
    kept = tok.decode(ids)
    assert "The passage ends here." in kept and "word0 " not in kept
    assert out[5].error.startswith("prompt too long") and out[5].prompt_tokens > 240


def test_an_exception_in_one_row_does_not_sink_its_batch(loaded, dolly_records, tokenizer_path):
    """A token the model has no embedding row for raises (a real IndexError from torch) for that
    row only: the batch is retried row by row and the other rows get their answers."""
    model, _ = loaded
    tok = load_tokenizer(tokenizer_path)
    tok.add_tokens(["<unseen-token>"])                     # id == the model's vocab size
    assert tok.convert_tokens_to_ids("<unseen-token>") >= model.get_input_embeddings().num_embeddings
    good = [dolly_records[i] for i in (0, 1, 3)]
    g = Generator(model, tok, GenerationParams(max_new_tokens=12))
    clean = run(g, good)
    out = g.generate([good[0]["instruction"], "Say <unseen-token> twice.", good[1]["instruction"],
                      good[2]["instruction"]], [good[0]["context"], "", good[1]["context"], good[2]["context"]])
    assert out[1].finish_reason == FINISH_ERROR and "IndexError" in out[1].error
    assert out[1].prompt_tokens and out[1].response is None
    assert [o.token_ids for o in (out[0], out[2], out[3])] == [c.token_ids for c in clean]
    with pytest.raises(ValueError, match="embedding"):
        check_dolly_tokenizer(tok, model)                  # what load_for_generation checks up front


def test_non_finite_logits_are_a_row_error(loaded, dolly_records, dolly_model_dir, tmp_path):
    """Weights that overflow (a NaN embedding row, as fp16 overflow would give) fail only the
    rows whose prompt uses them."""
    model, tok = loaded
    poisoned_dir = tmp_path / "poisoned"
    shutil.copytree(dolly_model_dir, poisoned_dir)
    m, _ = load_for_generation(str(poisoned_dir))
    good = dolly_records[1]
    clean = set(tok(format_inference_prompt(good["instruction"], good["context"]))["input_ids"])
    poison = [i for i in tok(format_inference_prompt("Describe a zebra", ""))["input_ids"] if i not in clean]
    assert poison
    with torch.no_grad():
        m.get_input_embeddings().weight[poison[0]] = float("nan")
    clean_run = Generator(model, tok, GenerationParams(max_new_tokens=64)).generate([good["instruction"]],
                                                                                   [good["context"]])[0]
    g = Generator(m, tok, GenerationParams(max_new_tokens=64))
    out = g.generate([good["instruction"], "Describe a zebra", good["instruction"]],
                     [good["context"], "", good["context"]])
    assert out[1].finish_reason == FINISH_ERROR and "non-finite" in out[1].error
    assert out[0].token_ids == out[2].token_ids == clean_run.token_ids
    assert out[0].finish_reason == FINISH_STOP and out[0].response == good["response"].strip()


def test_max_new_tokens_must_leave_room_for_a_prompt(loaded):
    with pytest.raises(ValueError, match="no room"):
        gen(loaded, max_new_tokens=512)          # the tiny model has 512 positions


@pytest.mark.gpu
def test_gpu_bf16_generation(dolly_model_dir, dolly_records):
    device = pick_device("auto")
    assert device.startswith("cuda")
    model, tok = load_for_generation(str(dolly_model_dir), device=device, dtype="auto")
    assert next(model.parameters()).dtype == pick_dtype(device) == torch.bfloat16
    recs = [dolly_records[i] for i in MEMORISED]
    out = Generator(model, tok, GenerationParams(max_new_tokens=32)).generate(
        [r["instruction"] for r in recs], [r["context"] for r in recs])
    assert all(o.finish_reason == FINISH_STOP for o in out)
    fp32, _ = load_for_generation(str(dolly_model_dir), device=device, dtype="float32")
    g = Generator(fp32, tok, GenerationParams(max_new_tokens=12))
    rows = dolly_records[:8]
    for r, o in zip(rows, run(g, rows)):
        assert o.token_ids == hf_greedy((fp32, tok), g.stop_ids, r["instruction"], r["context"], 12)
