"""Per-record metrics against values computed by hand on fixed strings, and against the reference
libraries (rouge-score's scorer, sacrebleu's sentence functions, SQuAD's script) on varied pairs."""
import random
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dollyflow.core.evaluation import metrics as m

rouge_score = pytest.importorskip("rouge_score")
sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("rapidfuzz")

LIB = Path(__file__).resolve().parents[3] / "lib"


# --- SQuAD normalisation, token F1, exact match -------------------------------------------------

def test_normalize_answer():
    # lower: "the  cat, sat on a mat!"; no punctuation: "the  cat sat on a mat";
    # no articles: "  cat sat on   mat"; whitespace collapsed:
    assert m.normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    # articles only as whole words ("theme", "an" inside "band" stay)
    assert m.normalize_answer("Theme of an old band") == "theme of old band"


def test_token_f1_by_hand():
    # pred "The cat sat on the mat." -> [cat, sat, on, mat] (4 tokens)
    # ref  "A cat sat on a red mat"  -> [cat, sat, on, red, mat] (5 tokens)
    # shared 4: P = 4/4, R = 4/5, F1 = 2 * 1 * 0.8 / 1.8 = 8/9
    assert m.token_f1("The cat sat on the mat.", "A cat sat on a red mat") == pytest.approx(8 / 9)
    # multiset overlap: pred [paris, paris, paris], ref [paris]: shared min(3, 1) = 1
    # P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 0.5
    assert m.token_f1("paris paris paris", "Paris.") == pytest.approx(0.5)
    assert m.token_f1("London", "Paris") == 0.0
    # both normalise to nothing -> 1.0; only one -> 0.0 (SQuAD v2.0)
    assert m.token_f1("The.", "a") == 1.0
    assert m.token_f1("the", "cat") == 0.0


def test_exact_match_by_hand():
    # "The Eiffel Tower." -> "eiffel tower"; "eiffel   tower" -> "eiffel tower"
    assert m.exact_match("The Eiffel Tower.", "eiffel   tower") == 1.0
    assert m.exact_match("Eiffel Tower, Paris", "eiffel tower") == 0.0


def test_length_ratio():
    assert m.length_ratio("one two three", "a b c d e f") == 0.5
    assert m.length_ratio("one two", "  ") is None


# --- ROUGE (rouge-score, stemmed), BLEU, chrF ----------------------------------------------------

def test_rouge_l_lcs_by_hand():
    # ref  [the, cat, sat, on, the, mat]  (6 tokens; none over 3 characters, so none stemmed)
    # pred [a, cat, on, a, mat]           (5 tokens)
    # LCS: cat (ref 2, pred 2) -> on (ref 4, pred 3) -> mat (ref 6, pred 5) = 3; no 4th:
    # "the"/"sat" are not in pred and "a" is not in ref.
    # P = 3/5, R = 3/6, F = 2 * 0.6 * 0.5 / 1.1 = 6/11
    got = m.rouge("a cat on a mat", "the cat sat on the mat")
    assert got["rougeL"] == pytest.approx(6 / 11)
    # unigrams shared (clipped): cat, on, mat = 3 -> the same 6/11; no shared bigram
    assert got["rouge1"] == pytest.approx(6 / 11)
    assert got["rouge2"] == 0.0


def test_rouge_1_2_by_hand():
    # ref  [the, cat, sat, on, the, mat], pred [the, cat, lay, on, a, mat]
    # unigrams: the min(1, 2) + cat + on + mat = 4 -> P = R = 4/6
    # bigrams: ref {the cat, cat sat, sat on, on the, the mat}, pred {the cat, cat lay, lay on, on a,
    # a mat}: shared "the cat" -> P = R = 1/5;  LCS the, cat, on, mat = 4 -> 4/6
    got = m.rouge("the cat lay on a mat", "the cat sat on the mat")
    assert got == pytest.approx({"rouge1": 4 / 6, "rouge2": 1 / 5, "rougeL": 4 / 6})


def test_rouge_stems():
    # Porter stems words over 3 characters: pred [the, cat, were, run], ref [a, cat, run]
    # shared cat, run: P = 2/4, R = 2/3, F = 2 * (1/2) * (2/3) / (7/6) = 4/7
    got = m.rouge("The cats were running", "a cat runs")
    assert got["rouge1"] == pytest.approx(4 / 7)
    assert got["rougeL"] == pytest.approx(4 / 7)


def test_rouge_scorer_is_made_once_and_matches_the_stock_stemming_scorer():
    assert m.rouge_scorer() is m.rouge_scorer()
    stock = rouge_score.rouge_scorer.RougeScorer(list(m.ROUGE_TYPES), use_stemmer=True)
    pairs = [("The cats were running quickly", "a cat runs quick"),
             ("Organisations generalized their organizational generalizations.", "organization general"),
             ("Café déjà vu, 42 times!", "cafe 42 time"), ("", "x"), ("connected connecting", "connection")]
    for pred, ref in pairs * 2:            # twice: the second pass reads the stem cache
        want = stock.score(ref, pred)
        assert m.rouge(pred, ref) == {k: want[k].fmeasure for k in m.ROUGE_TYPES}


def test_bleu_and_chrf_are_sacrebleus_over_100():
    pred, ref = "the cat sat on the mat", "the cat sat on a mat"
    assert m.bleu(pred, ref) == pytest.approx(sacrebleu.sentence_bleu(pred, [ref]).score / 100)
    assert m.chrf(pred, ref) == pytest.approx(sacrebleu.sentence_chrf(pred, [ref]).score / 100)
    assert 0 < m.bleu(pred, ref) < 1 and 0 < m.chrf(pred, ref) < 1
    # identical: every n-gram precision 1, no brevity penalty -> BLEU 1; chrF 1
    assert m.bleu(ref, ref) == pytest.approx(1.0)
    assert m.chrf(ref, ref) == pytest.approx(1.0)


# --- a record, a batch, missing and empty --------------------------------------------------------

def test_score_one_record():
    got = m.score("The cat sat on the mat.", "A cat sat on a red mat")
    assert set(got) == set(m.METRICS) | {"reason"}
    assert got["reason"] is None
    assert got["token_f1"] == pytest.approx(8 / 9)
    assert got["exact_match"] == 0.0
    assert got["length_ratio"] == pytest.approx(6 / 7)
    assert all(0 <= got[k] <= 1 for k in m.METRICS if k != "length_ratio")


@pytest.mark.parametrize("pred, reason", [(None, m.MISSING_PREDICTION), (float("nan"), m.MISSING_PREDICTION),
                                          ("", m.EMPTY_PREDICTION), (" \n\t", m.EMPTY_PREDICTION)])
def test_missing_or_blank_prediction_scores_zero_and_says_why(pred, reason):
    got = m.score(pred, "the reference")
    assert got["reason"] == reason
    assert all(got[k] == 0.0 for k in m.METRICS)


@pytest.mark.parametrize("ref, reason", [(None, m.MISSING_REFERENCE), (float("nan"), m.MISSING_REFERENCE),
                                         ("", m.EMPTY_REFERENCE), ("   ", m.EMPTY_REFERENCE)])
@pytest.mark.parametrize("pred", ["an answer", None, ""])
def test_no_reference_gives_no_metrics_and_says_why(ref, reason, pred):
    got = m.score(pred, ref)
    assert got["reason"] == reason and reason in m.UNSCORED
    assert all(got[k] is None for k in m.METRICS)


def test_a_non_string_is_a_type_error():
    with pytest.raises(TypeError):
        m.score(42, "x")


def test_score_many_is_score_as_columns():
    preds = ["The cat sat on the mat.", None, "", "Paris", "anything"]
    refs = ["A cat sat on a red mat", "x", "y", "paris", None]
    cols = m.score_many(preds, refs)
    assert set(cols) == set(m.METRICS) | {"reason"}
    rows = [m.score(p, r) for p, r in zip(preds, refs)]
    for name, values in cols.items():
        assert values == [row[name] for row in rows]
    assert cols["reason"] == [None, m.MISSING_PREDICTION, m.EMPTY_PREDICTION, None, m.MISSING_REFERENCE]
    assert cols["exact_match"][3] == 1.0
    assert m.score_many([], []) == {name: [] for name in m.METRICS + ("reason",)}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        m.score_many(["a", "b"], ["a"])


def test_the_package_imports_without_the_eval_libraries():
    code = ("import sys\n"
            "for name in ('rouge_score', 'sacrebleu', 'nltk', 'rapidfuzz'): sys.modules[name] = None\n"
            "import dollyflow.core.evaluation.metrics as m, dollyflow.core.evaluation.judge\n"
            "import dollyflow.core.evaluation.bootstrap, dollyflow.core.evaluation.headline\n"
            "assert m.token_f1('a b', 'b') > 0 and m.score(None, 'x')['reason'] == m.MISSING_PREDICTION\n"
            "try:\n    m.score('a', 'b')\nexcept ImportError:\n    print('deferred')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(LIB), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "deferred"


# --- the fast path against the libraries, on varied pairs ----------------------------------------

WORDS = ("the a an cat cats running runs ran generalization generalizations organizational connected "
         "connecting Paris paris PARIS 42 3.14 x y z it's don't well-known e-mail co-operate "
         "café déjà naïve Ångström İstanbul straße ß ǅ ﬁne ½ ² 日本語 東京 русский язык عربى 😀 👍🏽 "
         "a\u0301 ﬀ \u200b , . ! ? ; : ( ) \" ' - -- ... & % $ # @ / \\ * + = < >").split()


def _squad_normalize(s):
    """SQuAD v1.1's official evaluate script's normalize_answer, verbatim."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _varied_pairs(n=300, seed=22):
    """(prediction, reference) pairs: random word soups of every length class (empty, a word,
    a sentence, a paragraph, ~1,500 words), joined by varied whitespace, and predictions that are
    edits of their reference (drops, substitutions, repeats, truncation), copies, or unrelated."""
    rng = random.Random(seed)
    seps = [" ", " ", " ", "  ", "\n", "\t", "\n\n", "", " \u00a0"]

    def text(k):
        return "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(k))

    def length():
        return rng.choice([0, 1, 2, 5, 12, 40, 120]) if rng.random() > 0.02 else rng.randint(1200, 1600)

    pairs = [("", ""), ("", "cat"), ("cat", ""), ("!!!", "cat"), ("日本語", "東京"), ("cat cat cat", "cat"),
             ("a b a b a b", "b a b a"), ("The CAT.", "the cat")]
    while len(pairs) < n:
        ref = text(length())
        kind = rng.random()
        if kind < 0.2:
            pred = text(length())
        elif kind < 0.3:
            pred = ref
        else:
            words = []
            for w in ref.split(" "):
                r = rng.random()
                if r < 0.15:
                    continue
                words.append(rng.choice(WORDS) if r < 0.3 else w)
                if r > 0.95:
                    words.append(w)
            pred = " ".join(words[:max(1, int(len(words) * rng.uniform(0.3, 1.0)))] if rng.random() < 0.3 else words)
        pairs.append((pred, ref))
    return pairs


def test_fast_rouge_equals_rouge_scores_scorer_on_varied_pairs():
    stock = rouge_score.rouge_scorer.RougeScorer(list(m.ROUGE_TYPES), use_stemmer=True)
    pairs = _varied_pairs()
    assert sum(len(r.split()) > 1000 for _, r in pairs) >= 2          # the long ones are there
    for pred, ref in pairs:
        want = stock.score(ref, pred)
        assert m.rouge(pred, ref) == {k: want[k].fmeasure for k in m.ROUGE_TYPES}, (pred, ref)


def test_bleu_chrf_and_squad_equal_the_reference_code_on_varied_pairs():
    for pred, ref in _varied_pairs(seed=23):
        assert m.bleu(pred, ref) == min(1.0, sacrebleu.sentence_bleu(pred, [ref]).score / 100)
        assert m.chrf(pred, ref) == min(1.0, sacrebleu.sentence_chrf(pred, [ref]).score / 100)
        assert m.normalize_answer(pred) == _squad_normalize(pred)
        p, r = _squad_normalize(pred).split(), _squad_normalize(ref).split()
        same = sum((Counter(p) & Counter(r)).values())
        f1 = float(p == r) if not p or not r else 0.0 if not same else \
            2 * (same / len(p)) * (same / len(r)) / (same / len(p) + same / len(r))
        assert m.token_f1(pred, ref) == f1
        assert m.exact_match(pred, ref) == float(_squad_normalize(pred) == _squad_normalize(ref))


def test_score_many_equals_the_libraries_record_by_record():
    stock = rouge_score.rouge_scorer.RougeScorer(list(m.ROUGE_TYPES), use_stemmer=True)
    pairs = [(p, r) for p, r in _varied_pairs(n=200, seed=24)] + [(None, "x"), ("x", None), (" ", "x")]
    cols = m.score_many([p for p, _ in pairs], [r for _, r in pairs])
    for i, (pred, ref) in enumerate(pairs):
        got = {k: cols[k][i] for k in m.METRICS + ("reason",)}
        assert got == m.score(pred, ref)
        if got["reason"] is not None:
            continue
        want = stock.score(ref, pred)
        assert [got[k] for k in m.ROUGE_TYPES] == [want[k].fmeasure for k in m.ROUGE_TYPES]
        assert got["bleu"] == min(1.0, sacrebleu.sentence_bleu(pred, [ref]).score / 100)
        assert got["chrf"] == min(1.0, sacrebleu.sentence_chrf(pred, [ref]).score / 100)
        assert got["length_ratio"] == len(pred.split()) / len(ref.split())
    assert cols["reason"][-3:] == [m.MISSING_PREDICTION, m.MISSING_REFERENCE, m.EMPTY_PREDICTION]
