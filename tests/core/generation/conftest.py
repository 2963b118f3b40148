"""Fixtures of the generation tests: the tiny trained Dolly model (conftest ``dolly_model_dir``)
loaded for generation, fp32 on CPU, and 24 sample rows."""
import pytest

from dollyflow.core.models.loading import load_for_generation


@pytest.fixture(scope="module")
def loaded(dolly_model_dir):
    pytest.importorskip("torch")
    return load_for_generation(str(dolly_model_dir))


@pytest.fixture(scope="module")
def rows(dolly_records):
    """24 sample rows: short and long prompts, with and without context."""
    return dolly_records[:24]
