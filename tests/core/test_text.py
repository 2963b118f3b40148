"""Normalisation, exact keys and vectorised shingling (engine-free, no Spark)."""
import unicodedata

import numpy as np
import pytest

from dollyflow.core.text import (batch_shingles, exact_key, fields_and_key, jaccard, normalize,
                                 normalized_document, part_shingles, shingle_set, token_hashes,
                                 utf8_buffer)


def test_normalize_nfc_casefold_whitespace():
    assert normalize("  Caf\u00e9\tAU  lait \n") == "café au lait"
    assert normalize(unicodedata.normalize("NFD", "Café")) == normalize("CAFÉ") == "café"
    assert normalize("Straße") == normalize("STRASSE") == "strasse"
    assert normalize(None) == normalize("") == normalize(" \t\n") == ""


@pytest.mark.parametrize("variant", [
    lambda s: s.upper(),
    lambda s: s.replace(" ", "  ", 3) + "  ",
    lambda s: "\n " + s + " \t",
    lambda s: unicodedata.normalize("NFD", s),
])
def test_exact_key_ignores_make_corpus_exact_variants(variant):
    ins, ctx, res = "Who wrote Les Misérables?", "", "Victor Hugo wrote it in 1862."
    assert exact_key(variant(ins), ctx, res) == exact_key(ins, ctx, res)
    assert exact_key(ins, ctx, variant(res)) == exact_key(ins, ctx, res)


def test_exact_key_separates_content_and_fields():
    assert exact_key("a b", "", "c") != exact_key("a b", "", "d")
    assert exact_key("a b", "", "c") != exact_key("a", "b", "c")   # field boundaries count
    assert exact_key("a", "", "b c") != exact_key("a", "b", "c")
    assert exact_key("a", None, "b") == exact_key("a", "", "b")
    assert len(exact_key("a", "", "b")) == 16


def test_fields_and_key_agree_with_separate_functions():
    ins, ctx, res, key = fields_and_key(" Hello  World ", None, "ANSWER")
    assert (ins, ctx, res) == ("hello world", "", "answer")
    assert " ".join(f for f in (ins, ctx, res) if f) == normalized_document(" Hello  World ", "", "ANSWER")
    assert key == exact_key(" Hello  World ", "", "ANSWER")


def test_part_shingles_split_the_question_and_answer_from_the_passage():
    ins = ["the quick brown fox", "why", "", "a b"]
    ctx = ["a long shared passage", "", "only a passage", "a long shared passage"]
    res = ["jumps over", "because", "", "c"]
    shingles, parts = part_shingles(ins, ctx, res, 2)
    assert np.all(np.diff(parts) >= 0)
    m = len(ins)
    for i in range(m):
        qa = set(shingles[parts == i].tolist())
        assert qa == shingle_set(f"{ins[i]} {res[i]}".strip(), 2)
        assert set(shingles[parts == m + i].tolist()) == shingle_set(ctx[i], 2)
        if not ctx[i]:   # without context the qa part is the whole-record document
            assert qa == shingle_set(normalized_document(ins[i], ctx[i], res[i]), 2)
    assert not (set(shingles[parts == 2].tolist()))                           # no words: no shingles
    assert set(shingles[parts == m].tolist()) == set(shingles[parts == m + 3].tolist())
    with pytest.raises(ValueError):
        part_shingles(["a"], [], ["b"], 2)


def test_tokens_split_on_ascii_whitespace_and_punctuation_and_stay_in_their_document():
    data, offsets = utf8_buffer(["hello, world!", "hello", "naïve café", "", "...", "hello"])
    hashes, docs = token_hashes(data, offsets)
    assert docs.tolist() == [0, 0, 1, 2, 2, 5]
    assert hashes[0] == hashes[2] == hashes[5]          # the same word hashes the same anywhere
    assert len(set(hashes.tolist())) == 4               # hello, world, naïve, café


def test_token_hash_of_a_word_does_not_depend_on_its_offset():
    a, _ = token_hashes(*utf8_buffer(["abc"]))
    b, _ = token_hashes(*utf8_buffer(["x y zz abc"]))
    assert a[0] == b[-1]


def test_shingles_are_word_ngrams_that_never_cross_documents():
    texts = ["the quick brown fox", "jumps over", "dog", ""]
    shingles, docs = batch_shingles(texts, 2)
    assert docs.tolist() == [0, 0, 0, 1, 2]             # 3 bigrams, 1 bigram, 1 short-doc shingle
    for i, text in enumerate(texts):                    # batched == one by one
        assert set(shingles[docs == i].tolist()) == shingle_set(text, 2)
    assert shingle_set("a b", 2) != shingle_set("b a", 2)       # order matters within a window
    assert shingle_set("a b c", 1) == shingle_set("c b a", 1)   # unigrams are a bag of words
    assert shingles.dtype == np.uint32


def test_shingling_is_deterministic_and_batch_independent():
    texts = [f"record number {i} says something about topic {i % 7}" for i in range(500)]
    s1, d1 = batch_shingles(texts, 3)
    s2, d2 = batch_shingles(texts[250:], 3)
    assert np.array_equal(s1[d1 >= 250], s2) and np.array_equal(d1[d1 >= 250] - 250, d2)


def test_exact_jaccard_of_shingle_sets():
    a = shingle_set("one two three four five six seven eight nine ten", 2)
    b = shingle_set("one two three four five six seven eight nine eleven", 2)
    assert len(a) == len(b) == 9
    assert jaccard(a, b) == pytest.approx(8 / 10)
    assert jaccard(set(), set()) == 1.0
