"""The CTranslate2 engine against the torch core: the same greedy tokens in float32, int8 that
runs and stops, the same error rows, the conversion cache (reused, refreshed for another model,
rebuilt when damaged), LoRA adapters converted from merged weights, compute types checked
against the device. The tiny trained Dolly model of conftest ``dolly_model_dir``, on CPU."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

from dollyflow.core.generation import ct2 as ct2_mod
from dollyflow.core.generation.ct2_convert import MARKER
from dollyflow.core.generation.params import ERROR_EMPTY_INSTRUCTION, FINISH_ERROR, FINISH_STOP, GenerationParams
from dollyflow.core.models.files import model_digest

ctranslate2 = pytest.importorskip("ctranslate2", reason=ct2_mod.INSTALL_HINT)
torch = pytest.importorskip("torch")

from dollyflow.core.generation.ct2 import CT2Generator, check_compute_type, conversions, converted_dir  # noqa: E402
from dollyflow.core.generation.generator import Generator  # noqa: E402
from dollyflow.core.models.loading import load_for_generation  # noqa: E402

MEMORISED = (1, 3)   # conftest DOLLY_FIXTURE_RECORDS


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ct2-cache"))


@pytest.fixture(scope="module")
def fp32_dir(dolly_model_dir, cache_root):
    return converted_dir(str(dolly_model_dir), model_digest(str(dolly_model_dir)), "float32", cache_root)


def fields(g):
    """Every field of a Generation but its time."""
    return {k: v for k, v in dataclasses.asdict(g).items() if k != "seconds"}


def both(loaded, ct2_dir, rows=None, *, instructions=None, contexts=None, compute_type="float32",
         max_positions=None, max_batch_tokens=2048, **params):
    model, tok = loaded
    p = GenerationParams(**params)
    if rows is not None:
        instructions, contexts = [r["instruction"] for r in rows], [r["context"] for r in rows]
    torch_out = Generator(model, tok, p, max_positions=max_positions).generate(instructions, contexts)
    ct2_out = CT2Generator(ct2_dir, tok, p, compute_type=compute_type, max_positions=max_positions,
                           max_batch_tokens=max_batch_tokens).generate(instructions, contexts)
    return torch_out, ct2_out


def test_loading_the_module_imports_neither_torch_nor_ctranslate2():
    code = ("import sys, dollyflow.core.generation.ct2; "
            "print(sorted(m for m in ('torch', 'ctranslate2', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


def test_without_ctranslate2_require_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    assert not ct2_mod.available()
    with pytest.raises(ImportError, match=r"pip install 'dollyflow\[ctranslate2\]'"):
        ct2_mod.require()
    assert not ct2_mod.supports("/nonexistent")


def test_compute_types_are_checked_against_the_device():
    with pytest.raises(ValueError, match=r"infer.compute_type='float16'.*cpu.*supported there: .*float32"):
        check_compute_type("float16", "cpu")
    with pytest.raises(ValueError, match="infer.compute_type='fp8'"):
        check_compute_type("fp8", "cpu")
    assert check_compute_type("int8", "cpu") == "int8"
    assert check_compute_type("float32", "cpu") == "float32"
    assert check_compute_type("default", "cpu") == "default"


def test_supports_the_gpt_neox_model(dolly_model_dir, tmp_path):
    assert ct2_mod.supports(str(dolly_model_dir))
    assert not ct2_mod.supports(str(tmp_path))    # no config


def test_greedy_float32_equals_the_torch_core(loaded, fp32_dir, rows, dolly_records):
    """Every field (tokens, response, finish reason, token counts) of every row, with one
    batch and with CTranslate2 splitting the prompts into small token batches."""
    torch_out, ct2_out = both(loaded, fp32_dir, rows, max_new_tokens=12)
    assert [fields(a) for a in torch_out] == [fields(b) for b in ct2_out]
    small = CT2Generator(fp32_dir, loaded[1], GenerationParams(max_new_tokens=12), max_batch_tokens=64,
                         inter_threads=2, intra_threads=1)
    assert [fields(a) for a in small.generate([r["instruction"] for r in rows], [r["context"] for r in rows])] \
        == [fields(a) for a in torch_out]
    recs = [dolly_records[i] for i in MEMORISED]
    torch_out, ct2_out = both(loaded, fp32_dir, recs, max_new_tokens=64)
    assert [fields(a) for a in torch_out] == [fields(b) for b in ct2_out]
    for r, o in zip(recs, ct2_out):
        assert o.finish_reason == FINISH_STOP and o.response == r["response"].strip()
        assert o.seconds is not None and o.completion_tokens == len(o.token_ids)


def test_int8_runs_and_stops(loaded, dolly_model_dir, cache_root, dolly_records):
    int8 = converted_dir(str(dolly_model_dir), model_digest(str(dolly_model_dir)), "int8", cache_root)
    assert "-int8-" in os.path.basename(int8)
    recs = [dolly_records[i] for i in MEMORISED] * 3 + dolly_records[:6]
    out = CT2Generator(int8, loaded[1], GenerationParams(max_new_tokens=64), compute_type="int8").generate(
        [r["instruction"] for r in recs], [r["context"] for r in recs])
    assert all(o.error is None and o.completion_tokens for o in out)
    memorised = out[:6]
    assert sum(o.finish_reason == FINISH_STOP for o in memorised) >= 4   # stops at ### End for most rows


def test_bad_rows_give_the_torch_engines_error_rows(loaded, fp32_dir, dolly_records):
    """Null, blank and non-string instruction, non-string context, a context trimmed from the
    left, a prompt too long even without context: field for field the torch engine's rows."""
    good = [dolly_records[i] for i in (0, 1, 3)]
    long_context = " ".join(f"word{i}" for i in range(400)) + " The passage ends here."
    huge_instruction = " ".join(f"ask{i}" for i in range(400))
    instructions = [None, good[0]["instruction"], "   ", good[1]["instruction"], "Summarise.", huge_instruction,
                    good[2]["instruction"], 42, "Fine question.", ""]
    contexts = [None, good[0]["context"], "", good[1]["context"], long_context, "", good[2]["context"], "",
                ["not", "a", "string"], None]
    torch_out, ct2_out = both(loaded, fp32_dir, instructions=instructions, contexts=contexts, max_new_tokens=16,
                              max_positions=256)
    assert [fields(a) for a in torch_out] == [fields(b) for b in ct2_out]
    assert [o.finish_reason == FINISH_ERROR for o in ct2_out] == [True, False, True, False, False, True, False,
                                                                  True, True, True]
    assert ct2_out[0].error == ERROR_EMPTY_INSTRUCTION and ct2_out[4].trimmed_context_tokens > 0
    assert ct2_out[5].error.startswith("prompt too long") and "instruction must be a string" in ct2_out[7].error
    assert "context must be a string" in ct2_out[8].error


def test_a_failing_call_is_retried_row_by_row(loaded, fp32_dir, dolly_records, monkeypatch):
    g = CT2Generator(fp32_dir, loaded[1], GenerationParams(max_new_tokens=12))
    recs = dolly_records[:3]
    clean = g.generate([r["instruction"] for r in recs], [r["context"] for r in recs])
    real = g.generator.generate_batch
    calls = []

    def failing(tokens, **kw):
        calls.append(len(tokens))
        if len(tokens) > 1 or tokens[0] == g.tokenizer.convert_ids_to_tokens(clean_ids[1]):
            raise RuntimeError("boom")
        return real(tokens, **kw)

    clean_ids = [p.ids for p in g._fitter.prompts([r["instruction"] for r in recs], [r["context"] for r in recs],
                                                  [None] * 3, [None] * 3)]
    monkeypatch.setattr(g, "generator", type("G", (), {"generate_batch": staticmethod(failing)})())
    out = g.generate([r["instruction"] for r in recs], [r["context"] for r in recs])
    assert calls == [3, 1, 1, 1] and g.retried == 3
    assert out[1].finish_reason == FINISH_ERROR and out[1].error == "RuntimeError: boom"
    assert out[1].prompt_tokens == len(clean_ids[1])
    assert [fields(o) for o in (out[0], out[2])] == [fields(o) for o in (clean[0], clean[2])]


def test_sampling_runs_and_top_k_1_is_greedy(loaded, fp32_dir, rows):
    tok = loaded[1]
    ins, ctx = [r["instruction"] for r in rows[:6]], [r["context"] for r in rows[:6]]
    greedy = CT2Generator(fp32_dir, tok, GenerationParams(max_new_tokens=8)).generate(ins, ctx)
    top1 = CT2Generator(fp32_dir, tok, GenerationParams(max_new_tokens=8, do_sample=True, top_k=1, top_p=1.0)
                        ).generate(ins, ctx)
    assert [fields(a) for a in greedy] == [fields(b) for b in top1]
    sampled = CT2Generator(fp32_dir, tok, GenerationParams(max_new_tokens=8, do_sample=True, seed=3)).generate(ins, ctx)
    assert all(o.error is None and 1 <= o.completion_tokens <= 8 for o in sampled)


def test_the_conversion_cache_is_reused_refreshed_and_repaired(dolly_model_dir, tmp_path):
    root = str(tmp_path / "cache")
    src = str(dolly_model_dir)
    digest = model_digest(src)
    first = converted_dir(src, digest, "float32", root)
    n = conversions()
    stamp = os.stat(os.path.join(first, "model.bin")).st_mtime_ns
    assert converted_dir(src, digest, "float32", root) == first and conversions() == n    # reused
    assert os.stat(os.path.join(first, "model.bin")).st_mtime_ns == stamp
    assert os.path.basename(first) == f"{digest[:16]}-float32-{ctranslate2.__version__}"
    assert not [p for p in os.listdir(os.path.dirname(first)) if p.startswith(".tmp-")]
    # a damaged file: the entry is rebuilt
    with open(os.path.join(first, "model.bin"), "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\0" * 64)
    assert converted_dir(src, digest, "float32", root) == first and conversions() == n + 1
    # a partial entry (no marker): rebuilt
    os.remove(os.path.join(first, MARKER))
    assert converted_dir(src, digest, "float32", root) == first and conversions() == n + 2
    # another model: another digest, another entry
    changed = tmp_path / "changed"
    shutil.copytree(dolly_model_dir, changed)
    model, _ = load_for_generation(str(changed))
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.bias += 0.5
    model.save_pretrained(str(changed))
    other = model_digest(str(changed))
    assert other != digest
    again = converted_dir(str(changed), other, "float32", root)
    assert again != first and conversions() == n + 3 and os.path.isdir(first)


def test_a_lora_adapter_is_converted_from_its_merged_weights(loaded, dolly_model_dir, dolly_records, tmp_path):
    """A ``lora_save: adapter`` directory (adapter + tokenizer, base named in adapter_config.json)
    is merged with peft before converting: CTranslate2's tokens equal the merged torch model's."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(dolly_model_dir))
    lm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                                   task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = tmp_path / "adapter-model"
    lm.save_pretrained(str(adapter))
    tok = loaded[1]
    tok.save_pretrained(str(adapter))
    shutil.copyfile(dolly_model_dir / "generation_config.json", adapter / "generation_config.json")
    assert ct2_mod.supports(str(adapter))
    out = converted_dir(str(adapter), model_digest(str(adapter)), "float32", str(tmp_path / "cache"))
    assert ct2_mod.read_marker(out)["merged_lora"] is True
    merged = lm.merge_and_unload().eval()
    recs = dolly_records[:8]
    ins, ctx = [r["instruction"] for r in recs], [r["context"] for r in recs]
    p = GenerationParams(max_new_tokens=12)
    want = Generator(merged, tok, p).generate(ins, ctx)
    got = CT2Generator(out, tok, p).generate(ins, ctx)
    assert [fields(a) for a in want] == [fields(b) for b in got]
