"""The engine-free generation core: Dolly prompts, the batched decode loop, stopping, sampling
seeds, bad rows, model loading. A tiny GPT-NeoX trained to answer two sample records (conftest
``dolly_model_dir``), fp32 on CPU."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.generate import (ERROR_EMPTY_INSTRUCTION, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP,  # noqa: E402
                                     GenerationParams, Generator, cached, loads, next_tokens,
                                     row_generators, row_seed)
from dollyflow.core.model import (check_dolly_tokenizer, load_for_generation, model_digest,  # noqa: E402
                                  resolve_model_dir, source_kind, stop_token_ids, weight_files)
from dollyflow.core.prompt import END_KEY, format_inference_prompt  # noqa: E402

MEMORISED = (1, 3)   # conftest DOLLY_FIXTURE_RECORDS


@pytest.fixture(scope="module")
def loaded(dolly_model_dir):
    return load_for_generation(str(dolly_model_dir))


@pytest.fixture(scope="module")
def rows(dolly_records):
    """24 sample rows: short and long prompts, with and without context."""
    return dolly_records[:24]


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
    (core/neox.py) and through the model's own forward."""
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


def test_neox_step_equals_the_model_forward_on_a_padded_batch(loaded):
    """The hand-written GPT-NeoX decode step on a batch of rows right-aligned at different
    columns (grouped attention), for some rows only (finished ones skipped), gives the logits
    of the model's forward."""
    from dollyflow.core import neox
    from dollyflow.core.generate import new_cache

    model, _ = loaded
    assert neox.supports(model)
    lengths = [40, 38, 9, 7, 25, 3]
    width = max(lengths)
    torch.manual_seed(0)
    ids = torch.randint(10, 500, (len(lengths), width))
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step = neox.NeoXStep(model)
    with torch.inference_mode():
        caches = [new_cache(model, reserve=4) for _ in range(2)]
        for cache in caches:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        new = torch.tensor([11, 12, 13, 14, 15, 16])
        mask2 = torch.cat([mask, mask.new_ones((len(lengths), 1))], -1)
        want = model(input_ids=new[:, None], attention_mask=mask2, position_ids=pos[:, -1:] + 1, cache=caches[0],
                     use_cache=True).logits[:, -1]
        starts = (mask2 != 0).int().argmax(dim=1).tolist()
        live = [True, True, False, True, True, True]
        groups = neox.attention_groups(starts, live, width + 1)
        assert groups == [(0, 2, 0, True), (3, 6, 15, True)]     # finished row 2 attends to nothing
        rows = torch.tensor([j for j, alive in enumerate(live) if alive])
        got = step(new, pos[:, -1] + 1, caches[1], mask2, groups, rows)
    assert got.shape == (5, want.shape[-1])
    assert torch.allclose(got, want[rows], atol=1e-4)
    assert torch.equal(got.argmax(-1), want[rows].argmax(-1))


def test_attention_groups_trade_padding_against_calls():
    from dollyflow.core.neox import GROUP_COST_COLUMNS, attention_groups

    # equal starts: one group, no mask; finished rows split runs and are left out
    assert attention_groups([5, 5, 5], [True] * 3, 100) == [(0, 3, 5, False)]
    assert attention_groups([5, 5, 5, 5], [True, False, True, True], 100) == [(0, 1, 5, False), (2, 4, 5, False)]
    # a short row beside long ones: its own group when the padding saved exceeds a call's cost
    far = 1000 - GROUP_COST_COLUMNS // 2
    assert attention_groups([0, 0, 0, 0, far], [True] * 5, 1000) == [(0, 4, 0, False), (4, 5, far, False)]
    assert attention_groups([0, 0, 0, 0, 200], [True] * 5, 1000) == [(0, 5, 0, True)]
    assert attention_groups([0, 0, 3], [True] * 3, 100) == [(0, 3, 0, True)]   # a little padding: masked


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


def test_preallocated_cache_with_rows_leaving_and_padding_dropped(loaded):
    """The loop's KV cache: a long row leaves the batch, the short row's left padding is dropped,
    and its next logits equal those of the short row run alone."""
    from dollyflow.core.generate import _drop_left_padding, new_cache

    model, _ = loaded
    long_ids, short_ids = list(range(100, 130)), list(range(200, 210))
    ids = torch.tensor([long_ids, [0] * 20 + short_ids])
    mask = torch.tensor([[1] * 30, [0] * 20 + [1] * 10])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = new_cache(model, reserve=4)
        assert type(cache.layers[0]).__name__ == "PreallocatedLayer"
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([1]))
        mask = _drop_left_padding(cache, mask[[1]])
        assert mask.shape == (1, 10) and cache.get_seq_length() == 10
        mask = torch.cat([mask, mask.new_ones((1, 1))], -1)
        step = model(input_ids=torch.tensor([[7]]), attention_mask=mask, position_ids=torch.tensor([[10]]),
                     cache=cache, use_cache=True).logits[0, -1]
        alone = model(input_ids=torch.tensor([short_ids + [7]])).logits[0, -1]
    assert torch.allclose(step, alone, atol=1e-4)


def test_preallocated_cache_keeps_rows_in_place_and_merges_kept_rows():
    """Dropping finished rows moves the kept ones up inside the buffer (any subset, overlapping
    moves included); a merge takes the kept rows and drops the columns padding in all of them."""
    import random

    from dollyflow.core.generate import _preallocated_layer_class
    layer_class = _preallocated_layer_class()
    rng = random.Random(0)
    for _ in range(200):
        b, n = rng.randint(1, 12), rng.randint(1, 6)
        layer = layer_class(3)
        k, v = torch.randn(b, 2, n, 4), torch.randn(b, 2, n, 4)
        layer.update(k, v)
        buffer = layer._k.data_ptr()
        keep = sorted(rng.sample(range(b), rng.randint(1, b)))
        layer.batch_select_indices(torch.tensor(keep))
        assert torch.equal(layer.keys, k[keep]) and torch.equal(layer.values, v[keep])
        assert layer._k.data_ptr() == buffer                       # in place
        step = torch.randn(len(keep), 2, 1, 4)
        layer.update(step, step)
        assert torch.equal(layer.keys[:, :, -1:], step)
    # merge: rows 0 and 2 of a 3-row cache whose first column is padding for both
    a, other = layer_class(2), layer_class(2)
    a.update(torch.arange(3 * 4.0).view(3, 1, 4, 1), torch.zeros(3, 1, 4, 1))
    other.update(torch.full((1, 1, 2, 1), -1.0), torch.zeros(1, 1, 2, 1))
    a.merge(other, width=3, reserve=2, keep=[0, 2], first=1)
    assert a.keys[:, 0, :, 0].tolist() == [[1, 2, 3], [9, 10, 11], [0, -1, -1]]
    assert a._k.shape[2] == 5


def test_admission_respects_the_token_budget(loaded):
    from collections import deque

    from dollyflow.core.generate import _Prompt
    g = gen(loaded, max_new_tokens=20, batch_tokens=400, max_batch_size=3)
    queue = deque(_Prompt(i, [1] * n, 0) for i, n in enumerate([300, 200, 50, 40, 10, 5]))
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


def test_sampling_follows_the_filtered_distribution():
    """Gumbel-max sampling draws from softmax(logits / T) restricted by top_k / top_p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 6000

    def freq(**kw):
        toks = next_tokens(logits.repeat(n, 1), GenerationParams(do_sample=True, **kw), row_generators(range(n), "cpu"))
        return np.bincount(toks.numpy(), minlength=5) / n

    def close(got, want):
        return np.abs(got - np.asarray(want)).max() < 0.025

    p = torch.softmax(logits, -1).numpy()
    assert close(freq(top_p=1.0), p)
    assert close(freq(top_p=1.0, temperature=0.5), torch.softmax(logits / 0.5, -1).numpy())
    assert close(freq(top_p=1.0, top_k=2), np.r_[p[:2] / p[:2].sum(), 0, 0, 0])
    # top_p keeps the best tokens until their mass reaches top_p: p = [.53, .20, .12, .07, .03]
    keep = np.cumsum(p) - p < 0.6
    assert keep.tolist() == [True, True, False, False, False]
    assert close(freq(top_p=0.6), np.where(keep, p, 0) / p[keep].sum())
    assert row_seed(42, "a", "b") == row_seed(42, "a", "b") != row_seed(43, "a", "b")
    assert 0 <= row_seed(1, "x", None) < 2**63


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
    ids, dropped, _ = g._fit("Summarise.", long_context, full)
    assert dropped == trimmed.trimmed_context_tokens and len(ids) == trimmed.prompt_tokens
    kept = tok.decode(ids)
    assert "The passage ends here." in kept and "word0 " not in kept
    assert out[5].error.startswith("prompt too long") and out[5].prompt_tokens > 240


def test_an_exception_in_one_row_does_not_sink_its_batch(loaded, dolly_records, tokenizer_path):
    """A token the model has no embedding row for raises (a real IndexError from torch) for that
    row only: the batch is retried row by row and the other rows get their answers."""
    from dollyflow.core.tokens import load_tokenizer

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


def test_params_identity_and_validation():
    a = GenerationParams()
    assert a.to_dict() == {"max_new_tokens": 256, "do_sample": False}   # greedy ignores sampling knobs
    assert GenerationParams(top_p=0.5).digest() == a.digest()
    s = GenerationParams(do_sample=True)
    assert json.loads(s.to_json()) == {"max_new_tokens": 256, "do_sample": True, "temperature": 1.0,
                                       "top_p": 0.92, "top_k": 0, "seed": 42}
    assert s.digest() != a.digest() != GenerationParams(max_new_tokens=10).digest()
    for bad in (dict(max_new_tokens=0), dict(do_sample=True, temperature=0), dict(do_sample=True, top_p=0),
                dict(do_sample=True, top_k=-1)):
        with pytest.raises(ValueError):
            GenerationParams(**bad)


def test_max_new_tokens_must_leave_room_for_a_prompt(loaded):
    with pytest.raises(ValueError, match="no room"):
        gen(loaded, max_new_tokens=512)          # the tiny model has 512 positions


def test_model_sources_digest_and_safetensors_only(dolly_model_dir, tmp_path):
    d = str(dolly_model_dir)
    assert source_kind(d) == "dir" and resolve_model_dir(d) == d
    assert source_kind("EleutherAI/pythia-410m") == "hub"
    assert source_kind("runs:/abc/model") == "mlflow" and source_kind("s3://b/m") == "uri"
    with pytest.raises(FileNotFoundError):
        source_kind(str(tmp_path / "missing" / "model"))
    digest = model_digest(d)
    assert len(digest) == 64 and model_digest(d) == digest
    copy = tmp_path / "copy"
    shutil.copytree(dolly_model_dir, copy)
    assert model_digest(str(copy)) == digest            # content, not location
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\x00")
    assert model_digest(str(copy)) != digest
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weight_files(str(pickled))


def test_file_uri_sources_are_fetched_once_per_machine(dolly_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"file://{dolly_model_dir}"
    local = resolve_model_dir(uri)
    assert local.startswith(str(tmp_path / "cache")) and model_digest(local) == model_digest(str(dolly_model_dir))
    mtime = (tmp_path / "cache").stat().st_mtime_ns
    assert resolve_model_dir(uri) == local and (tmp_path / "cache").stat().st_mtime_ns == mtime


def test_a_tokenizer_without_dolly_tokens_is_refused(tokenizer_path):
    from dollyflow.core.tokens import load_tokenizer
    with pytest.raises(ValueError, match="special tokens"):
        check_dolly_tokenizer(load_tokenizer(tokenizer_path, dolly_tokens=False))


def test_the_model_cache_loads_once_per_key():
    before = loads()
    built = []

    def load():
        built.append(1)
        return ("model", "tokenizer")
    key = ("test-digest", "cpu", "float32", object())
    assert cached(key, load) == (("model", "tokenizer"), True)
    assert cached(key, load) == (("model", "tokenizer"), False)
    assert len(built) == 1 and loads() == before + 1


@pytest.mark.slow
def test_mlflow_run_uri_loads_the_logged_directory(dolly_model_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("DOLLYFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: undo both, or the train job of a later
    # test in this process would track into this test's store
    tracking = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)   # the original value comes back at teardown
    mlflow.set_tracking_uri(tracking)
    try:
        with mlflow.start_run() as active:
            mlflow.log_artifacts(str(dolly_model_dir), artifact_path="model")
        uri = f"runs:/{active.info.run_id}/model"
        local = resolve_model_dir(uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert model_digest(local) == model_digest(str(dolly_model_dir))
    model, tok = load_for_generation(local)
    assert len(tok) == model.get_input_embeddings().num_embeddings


@pytest.mark.gpu
def test_gpu_bf16_generation(dolly_model_dir, dolly_records):
    from dollyflow.core.model import pick_device, pick_dtype
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
