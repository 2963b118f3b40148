"""The generic decode path of :class:`Generator` (the model's own forward and cache) on tiny random
Llama, Qwen2 and Mistral models built from their configs, in both prompt formats: greedy output
equals transformers' ``generate`` whatever the batching, seeded sampling is per row, bad rows are
error rows, long contexts are trimmed."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dollyflow.core.generation.generator import Generator  # noqa: E402
from dollyflow.core.generation.params import FINISH_ERROR, GenerationParams  # noqa: E402
from dollyflow.core.models.build import tiny_causal_lm  # noqa: E402
from dollyflow.core.prompt_format import ChatFormat, DollyFormat, prompt_tokenizer  # noqa: E402
from dollyflow.testing.fixtures import chat_tokenizer  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tokenizer_path):
    chat_dir = chat_tokenizer(tokenizer_path, tmp_path_factory.mktemp("chat-tok"), "llama3")
    return {"dolly": prompt_tokenizer(str(tokenizer_path), "dolly"),
            "chat_template": prompt_tokenizer(str(chat_dir), "chat_template", "Answer briefly.")}


@pytest.fixture(scope="module")
def rows(dolly_records):
    return dolly_records[:10]


def hf_greedy(model, tok, fmt, instruction, context, stop_ids, n):
    ids = tok(fmt.prompt_text(instruction, context), add_special_tokens=fmt.add_special_tokens,
              return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt_name", ["dolly", "chat_template"])
def test_greedy_equals_generate_whatever_the_batch(arch, fmt_name, tokenizers, rows):
    tok, fmt = tokenizers[fmt_name]
    assert isinstance(fmt, ChatFormat if fmt_name == "chat_template" else DollyFormat)
    model = tiny_causal_lm(arch, len(tok), max_position_embeddings=512).eval()
    p = GenerationParams(max_new_tokens=8)
    ins, ctx = [r["instruction"] for r in rows], [r["context"] for r in rows]
    whole = Generator(model, tok, p, prompt_format=fmt)
    assert whole._step is None                      # not GPT-NeoX: the model's own forward
    single = Generator(model, tok, p, prompt_format=fmt, max_batch_size=1)
    refilled = Generator(model, tok, p, prompt_format=fmt, max_batch_size=3)
    outs = [g.generate(ins, ctx) for g in (whole, single, refilled)]
    assert refilled.prefills > 3 and whole.retried == refilled.retried == 0
    if fmt_name == "chat_template":               # the template's end of turn and eos stop a row
        assert whole.stop_ids == sorted({tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id})
    for i, r in enumerate(rows):
        ref = hf_greedy(model, tok, fmt, r["instruction"], r["context"], whole.stop_ids, 8)
        assert [o[i].token_ids for o in outs] == [ref] * 3, (arch, fmt_name, i)
        assert all(o[i].error is None for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_seeds_errors_and_trimming_on_the_generic_path(arch, tokenizers, rows):
    tok, fmt = tokenizers["chat_template"]
    model = tiny_causal_lm(arch, len(tok), max_position_embeddings=512).eval()
    sample = GenerationParams(max_new_tokens=6, do_sample=True, top_p=0.9, seed=7)
    ins, ctx = [r["instruction"] for r in rows], [r["context"] for r in rows]
    a = Generator(model, tok, sample, prompt_format=fmt).generate(ins, ctx, seeds=list(range(len(rows))))
    b = Generator(model, tok, sample, prompt_format=fmt, max_batch_size=2).generate(
        ins[::-1], ctx[::-1], seeds=list(range(len(rows)))[::-1])
    assert [x.token_ids for x in a] == [x.token_ids for x in b[::-1]]    # per-row seeds, not batch order
    # bad rows become error rows, the others are answered
    out = Generator(model, tok, GenerationParams(max_new_tokens=4), prompt_format=fmt).generate(
        [None, "  ", 5, "Name a colour."], [None, None, None, None])
    assert [o.finish_reason == FINISH_ERROR for o in out] == [True, True, True, False]
    # a context too long for the positions is trimmed from the left, inside the template
    long_ctx = " ".join(["word"] * 400)
    g = Generator(model, tok, GenerationParams(max_new_tokens=4), prompt_format=fmt, max_positions=128)
    (o,) = g.generate(["Summarise."], [long_ctx])
    assert o.error is None and o.trimmed_context_tokens > 0 and o.prompt_tokens <= 124


def test_a_tokenizer_without_template_or_dolly_tokens_fails_naming_the_key(tokenizer_path):
    from dollyflow.core.tokens import load_tokenizer

    plain = load_tokenizer(str(tokenizer_path), dolly_tokens=False)
    with pytest.raises(ValueError, match="prompt.format=chat_template"):
        prompt_tokenizer(str(tokenizer_path), "chat_template")
    model = tiny_causal_lm("llama", len(plain))
    with pytest.raises(ValueError, match="Dolly's special tokens"):
        Generator(model, plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_ctranslate2_converts_the_architecture_and_equals_the_torch_core(arch, tokenizers, tmp_path):
    """CTranslate2's own loaders for Llama, Qwen2 and Mistral (rope theta 500000, as Llama 3 has):
    greedy tokens equal the torch core's, in the chat format recorded in the model directory."""
    pytest.importorskip("ctranslate2")
    from transformers import AutoConfig, AutoModelForCausalLM

    from dollyflow.core.generation import ct2_convert
    from dollyflow.core.generation.ct2 import CT2Generator
    from dollyflow.core.models.loading import load_for_generation, prompt_format_of
    from dollyflow.core.prompt_format import provenance
    from dollyflow.testing.fixtures import save_model_dir

    tok, fmt = tokenizers["chat_template"]
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    d = save_model_dir(AutoModelForCausalLM.from_config(cfg), tok, tmp_path / arch, {"prompt": provenance(fmt)})
    assert ct2_convert.supports(str(d))
    converted = ct2_convert.converted_dir(str(d), f"{arch}-digest-0123456789", "float32", str(tmp_path / "cache"))
    model, tk = load_for_generation(str(d))
    loaded_fmt = prompt_format_of(str(d), tk)
    assert loaded_fmt.name == "chat_template" and loaded_fmt.system == "Answer briefly."
    ins, ctx = ["Name a colour. " * 20, "What is 2+2?"], ["", "maths " * 30]
    a = Generator(model, tk, GenerationParams(max_new_tokens=8), prompt_format=loaded_fmt).generate(ins, ctx)
    b = CT2Generator(converted, tk, GenerationParams(max_new_tokens=8), prompt_format=loaded_fmt).generate(ins, ctx)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
