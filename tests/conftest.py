from __future__ import annotations

import pytest

from tests.helpers import MODEL_HOME


@pytest.fixture(scope="session")
def model_home():
    """Shared cache of converted models (the embedded GGUF is converted once per machine)."""
    MODEL_HOME.mkdir(parents=True, exist_ok=True)
    return MODEL_HOME
