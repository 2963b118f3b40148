"""Tokenizer with Dolly's special tokens, batched encoding, label offsets and drops."""
import json

import pytest

from dollyflow.core.prompt import (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL, format_inference_prompt,
                                   format_training_prompt)
from dollyflow.core.tokens import (IGNORE_INDEX, backend_from_json, encode_records, labels_for, load_tokenizer,
                                   loaded_backends, save_tokenizer, special_token_ids, tokenizer_sha256,
                                   train_small_tokenizer)


@pytest.fixture(scope="module")
def records(sample_path):
    return [json.loads(line) for line in open(sample_path, encoding="utf-8")]


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def backend(tok):
    return backend_from_json(tok.backend_tokenizer.to_str())


def encode(backend, recs, max_length=100_000):
    return encode_records(backend, [r["instruction"] for r in recs], [r["context"] for r in recs],
                          [r["response"] for r in recs], max_length)


def test_real_gpt_neox_gets_dollys_ids_beyond_the_base_vocab(gpt_neox_tokenizer_path):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(str(gpt_neox_tokenizer_path))
    assert len(base) == 50277
    tok = load_tokenizer(gpt_neox_tokenizer_path)
    ids = special_token_ids(tok)
    assert [ids[END_KEY], ids[INSTRUCTION_KEY], ids[RESPONSE_KEY_NL]] == [50277, 50278, 50279]
    assert len(tok) == 50280
    assert ids["pad"] == ids["eos"] == 0 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    # each key is one token inside a prompt
    ids_of = tok(format_training_prompt("Q", "R", "C"))["input_ids"]
    for key in (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL):
        assert ids_of.count(ids[key]) == 1


def test_batch_encoding_equals_whole_prompt_encoding(tok, backend, records):
    enc = encode(backend, records)
    assert enc.drop_reason == [None] * len(records)
    for r, ids, start, n in zip(records, enc.input_ids, enc.response_start, enc.length):
        assert ids == tok(format_training_prompt(r["instruction"], r["response"], r["context"]))["input_ids"]
        assert n == len(ids)
        # the loss starts right after "### Response:\n": the prefix is exactly the inference prompt
        assert ids[:start] == tok(format_inference_prompt(r["instruction"], r["context"]))["input_ids"]
        assert ids[start - 1] == tok.convert_tokens_to_ids(RESPONSE_KEY_NL)
        assert ids[-1] == tok.convert_tokens_to_ids(END_KEY)


def test_labels_token_for_token(tok, backend):
    enc = encode(backend, [{"instruction": "Name a colour.", "context": "", "response": "Blue."}])
    ids, start = enc.input_ids[0], enc.response_start[0]
    labels = labels_for(ids, start)
    resp_id = tok.convert_tokens_to_ids(RESPONSE_KEY_NL)
    assert labels[:start] == [IGNORE_INDEX] * start
    assert labels[start:] == ids[start:] == tok("Blue.\n\n### End")["input_ids"]
    # Dolly's collator: -100 up to and including the first "### Response:\n" id
    assert labels == [IGNORE_INDEX] * (ids.index(resp_id) + 1) + ids[ids.index(resp_id) + 1:]


def test_response_key_inside_the_record_does_not_move_the_offset(tok, backend):
    rec = {"instruction": "Explain '### Response:\n' markers.", "context": "", "response": "They mark it."}
    enc = encode(backend, [rec])
    ids, start = enc.input_ids[0], enc.response_start[0]
    assert ids == tok(format_training_prompt(rec["instruction"], rec["response"]))["input_ids"]
    assert tok.decode(ids[start:]) == "They mark it.\n\n### End"


def test_drops_are_counted_with_their_reason(backend, records):
    recs = records[:20] + [{"instruction": " ", "context": "", "response": "x"},
                           {"instruction": "q", "context": "", "response": None}]
    full = encode(backend, records[:20])
    limit = sorted(full.length)[10]
    enc = encode(backend, recs, max_length=limit)
    too_long = sum(n > limit for n in full.length)
    assert enc.drop_reason.count("too_long") == too_long > 0
    assert enc.drop_reason[-2:] == ["empty_instruction", "empty_response"]
    for ids, n, reason in zip(enc.input_ids, enc.length, enc.drop_reason):
        if reason is None:
            assert len(ids) == n <= limit
        else:
            assert ids is None
    # at exactly max_length a record is kept (never truncated, never cut before ### End)
    exact = encode(backend, records[:1], max_length=full.length[0])
    assert exact.drop_reason == [None] and exact.length == [full.length[0]]


def test_backend_is_built_once_per_process(tok):
    text = tok.backend_tokenizer.to_str()
    a = backend_from_json(text)
    n = loaded_backends()
    assert backend_from_json(text) is a and loaded_backends() == n


def test_small_tokenizer_and_saved_copy(tmp_path, records):
    texts = [r[k] for r in records for k in ("instruction", "context", "response")]
    train_small_tokenizer(texts, tmp_path / "small", vocab_size=600)
    tok = load_tokenizer(tmp_path / "small")
    ids = special_token_ids(tok)
    assert tok.eos_token == "<|endoftext|>" and ids["eos"] == ids["pad"] == 0
    base = len(tok) - 3
    assert [ids[END_KEY], ids[INSTRUCTION_KEY], ids[RESPONSE_KEY_NL]] == [base, base + 1, base + 2]
    info = save_tokenizer(tok, tmp_path / "saved")
    assert info["sha256"] == tokenizer_sha256(tmp_path / "saved")[0]
    assert "tokenizer.json" in info["files"]
    again = load_tokenizer(tmp_path / "saved", dolly_tokens=False)
    assert special_token_ids(again) == ids
    text = format_training_prompt("Q?", "A.", "C")
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    # changing a file changes the digest
    (tmp_path / "saved" / "tokenizer_config.json").write_text("{}")
    assert tokenizer_sha256(tmp_path / "saved")[0] != info["sha256"]


def test_non_ascii_and_odd_records_find_the_response_start(tok, backend):
    """The response start is located by character position in the whole prompt: text before it
    in other scripts, emoji, the key itself or an unfinished key in the record do not move it."""
    recs = [{"instruction": "Übersetze: 你好，世界 🌍", "context": "Контекст — ok", "response": "Hallo, Welt!"},
            {"instruction": "What does ### Response: mean?", "context": "### Response:\n### End",
             "response": "A marker ### Response:\n inside."},
            {"instruction": "Trailing spaces   ", "context": "", "response": "  leading spaces"}]
    enc = encode(backend, recs)
    for r, ids, start in zip(recs, enc.input_ids, enc.response_start):
        assert ids == tok(format_training_prompt(r["instruction"], r["response"], r["context"]))["input_ids"]
        assert ids[:start] == tok(format_inference_prompt(r["instruction"], r["context"]))["input_ids"]


def test_prefix_and_suffix_encoding_is_the_fallback(tok, backend, records):
    """Where the whole prompt's token at the prefix's end is not the key (char_to_token finds
    nothing), the record is encoded as prefix + suffix: same ids, same start."""
    class NoOffsets:
        """The real tokenizer, with encodings that cannot map characters to tokens."""
        def __init__(self, real):
            self.real = real

        def token_to_id(self, t):
            return self.real.token_to_id(t)

        def encode_batch(self, texts, **kw):
            class Enc:
                def __init__(self, e):
                    self.ids = e.ids

                def char_to_token(self, _pos):
                    return None
            return [Enc(e) for e in self.real.encode_batch(texts, **kw)]

    assert encode(NoOffsets(backend), records[:10]).__dict__ == encode(backend, records[:10]).__dict__


def test_the_intro_is_encoded_once_where_that_gives_the_same_ids(tok, backend, records):
    """Dolly's intro line is the same first segment of every prompt (``### Instruction:`` splits
    the text): it is encoded once per tokenizer, and the ids are still the whole prompt's. A
    tokenizer where the key does not split the text encodes whole prompts."""
    from tokenizers import Tokenizer

    from dollyflow.core.tokens import INTRO_SEGMENT, intro_ids

    assert intro_ids(backend) == tok(INTRO_SEGMENT)["input_ids"]
    # the key as an ordinary text: no split, so no reuse; ids still equal the tokenizer's own
    plain = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    raw = json.loads(plain.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != INSTRUCTION_KEY]
    plain = Tokenizer.from_str(json.dumps(raw))
    assert intro_ids(plain) is None
    enc = encode(plain, records[:10])
    for r, ids in zip(records[:10], enc.input_ids):
        assert ids == plain.encode(format_training_prompt(r["instruction"], r["response"], r["context"])).ids
