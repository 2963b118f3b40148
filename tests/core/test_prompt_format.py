"""prompt.format=chat_template without Spark: rendering, the assistant-only labels, the refusals
naming the key, what the manifest and the model directory record, LoRA targets by architecture."""
from __future__ import annotations

import json

import pytest

from dollyflow.core.prompt_format import (CHAT_TEMPLATE, ChatFormat, DollyFormat, encode_records, format_from_info,
                                          prompt_tokenizer, recorded)
from dollyflow.core.tokens import backend_from_json, backend_json, load_tokenizer
from dollyflow.testing.fixtures import chat_tokenizer

STYLES = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "<|endoftext|>"}


@pytest.fixture(scope="module", params=list(STYLES))
def chat(request, tmp_path_factory, tokenizer_path):
    style = request.param
    path = chat_tokenizer(tokenizer_path, tmp_path_factory.mktemp(style), style)
    system = "" if style == "mistral" else "Be brief."
    tok, fmt = prompt_tokenizer(str(path), CHAT_TEMPLATE, system)
    return style, path, tok, fmt


def test_labels_are_the_assistant_tokens_and_one_end_of_turn(chat, dolly_records):
    style, _, tok, fmt = chat
    recs = dolly_records[:30]
    enc = encode_records(backend_from_json(backend_json(tok)), fmt, [r["instruction"] for r in recs],
                         [r["context"] for r in recs], [r["response"] for r in recs], 4096)
    eot = tok.convert_tokens_to_ids(STYLES[style])
    assert fmt.end_of_turn_id(tok) == eot and fmt.stop_ids(tok) == sorted({eot, tok.eos_token_id})
    for r, ids, start, why in zip(recs, enc.input_ids, enc.response_start, enc.drop_reason):
        assert why is None
        msgs = fmt.messages(r["instruction"], r["context"])
        # everything before the labels is transformers' own generation prompt, token for token
        assert ids[:start] == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]
        assert ids[-1] == eot and eot not in ids[start:-1]
        assert tok.decode(ids[start:-1]).strip() == r["response"].strip()
        # and the whole conversation decodes to the template's rendering, cut after the end of turn
        whole = tok.apply_chat_template(msgs + [{"role": "assistant", "content": r["response"]}], tokenize=False)
        assert whole.startswith(tok.decode(ids))


def test_drops_are_counted_with_their_reason(chat):
    _, _, tok, fmt = chat
    enc = encode_records(backend_from_json(backend_json(tok)), fmt, ["Q", " ", "Q", "Long " * 300],
                         [None, None, "c", None], ["A", "A", "", "A"], 64)
    assert enc.drop_reason == [None, "empty_instruction", "empty_response", "too_long"]
    assert enc.input_ids[3] is None and enc.length[3] > 64


def test_no_token_is_added_and_pad_falls_back_to_eos(chat):
    style, path, tok, fmt = chat
    plain = load_tokenizer(str(path), dolly_tokens=False)
    assert len(tok) == len(plain) and "### End" not in tok.get_vocab()
    assert tok.pad_token_id is not None
    if style == "llama3":                          # Llama 3 has no pad token: eos pads
        assert plain.pad_token_id is None and tok.pad_token_id == tok.eos_token_id
    # the format travels to Spark workers as a dict and back
    from dollyflow.core.prompt_format import from_dict
    assert from_dict(fmt.to_dict()) == fmt and isinstance(from_dict(None), DollyFormat)


def test_refusals_name_the_key(tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match=r"prompt.format=chat_template: the tokenizer .* has no chat template"):
        prompt_tokenizer(str(tokenizer_path), CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="prompt.format must be one of dolly, chat_template"):
        prompt_tokenizer(str(tokenizer_path), "alpaca")
    tok = load_tokenizer(str(tokenizer_path), dolly_tokens=False)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="does not start with a special token"):
        ChatFormat.from_tokenizer(tok)
    mistral = chat_tokenizer(tokenizer_path, tmp_path / "m", "mistral")
    with pytest.raises(ValueError, match="prompt.system: the chat template .* writes no system turn"):
        prompt_tokenizer(str(mistral), CHAT_TEMPLATE, "Be brief.")


def test_recorded_format_and_legacy_manifests(chat, tokenizer_path):
    _, _, tok, fmt = chat
    assert recorded(None) == {"format": "dolly", "system": ""}
    assert recorded({"prompt_format": "dolly"}) == {"format": "dolly", "system": ""}
    info = {"prompt": {"format": CHAT_TEMPLATE, "system": fmt.system}}
    assert format_from_info(info, tok) == fmt
    # nothing recorded: Dolly's tokens mean dolly, a template without them means the template
    assert isinstance(format_from_info(None, load_tokenizer(str(tokenizer_path))), DollyFormat)
    assert format_from_info(None, tok).name == CHAT_TEMPLATE


def test_generation_config_and_card_of_a_chat_model(chat):
    from dollyflow.core.training.model_dir import generation_config, model_card

    style, _, tok, fmt = chat
    gc = generation_config(tok, {"format": CHAT_TEMPLATE, "system": fmt.system})
    assert gc.eos_token_id == fmt.stop_ids(tok) and gc.pad_token_id == tok.pad_token_id
    card = model_card({"base_model": "Qwen/Qwen2.5-0.5B", "prompt": {"format": CHAT_TEMPLATE, "system": "Hi"},
                       "architecture": "qwen2", "method": "lora"})
    assert "chat template" in card and "### Instruction:" not in card and "  - qwen2" in card


@pytest.mark.parametrize("arch,targets,want", [
    ("llama", ["auto"], None), ("llama", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], None),
    ("qwen2", ["all-linear"], "all-linear"), ("mistral", ["q_proj", "o_proj"], ["q_proj", "o_proj"]),
    ("gpt_neox", ["auto"], ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])])
def test_lora_targets_by_architecture(arch, targets, want):
    pytest.importorskip("torch")
    from dollyflow.core.models.build import tiny_causal_lm
    from dollyflow.core.training.modeling import lora_targets

    assert lora_targets(targets, tiny_causal_lm(arch, 100)) == want


def test_lora_targets_that_name_no_module_fail_naming_the_key():
    pytest.importorskip("torch")
    from dollyflow.core.models.build import tiny_causal_lm
    from dollyflow.core.training.modeling import lora_targets

    with pytest.raises(ValueError, match=r"train.lora_target_modules: \['c_attn'\] name no module of this llama"):
        lora_targets(["c_attn"], tiny_causal_lm("llama", 100))


def test_shards_and_base_model_record_the_chat_format(chat, dolly_records, tmp_path):
    pytest.importorskip("torch")
    from dollyflow.core.models.build import TINY_MODELS
    from dollyflow.core.shards.build import build_shard_dir
    from dollyflow.core.training.base import write_base_model

    style, path, tok, fmt = chat
    manifest = build_shard_dir(dolly_records[:20], path, tmp_path / "shards", max_length=4096, test_size=4,
                               num_shards=1, prompt_format=CHAT_TEMPLATE, system=fmt.system)
    assert manifest["prompt"] == {"format": CHAT_TEMPLATE, "system": fmt.system}
    assert manifest["prompt_format"] == CHAT_TEMPLATE and manifest["drops"] == {}
    assert "tiny-llama" in TINY_MODELS
    prov = write_base_model("tiny-llama", str(tmp_path / "shards"), str(tmp_path / "base"), 256)
    assert prov["prompt"]["format"] == CHAT_TEMPLATE
    gc = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    assert gc["eos_token_id"] == fmt.stop_ids(tok)
