import pytest

from tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level tokenizer (259 ids) with a ChatML template; see tests/tiny_tokenizer.py."""
    return make_tiny_tokenizer()
