"""Loading for generation: a tokenizer without Dolly's special tokens is refused."""
import pytest

pytest.importorskip("torch")

from dollyflow.core.models.loading import check_dolly_tokenizer  # noqa: E402
from dollyflow.core.tokens import load_tokenizer  # noqa: E402


def test_a_tokenizer_without_dolly_tokens_is_refused(tokenizer_path):
    with pytest.raises(ValueError, match="special tokens"):
        check_dolly_tokenizer(load_tokenizer(tokenizer_path, dolly_tokens=False))
