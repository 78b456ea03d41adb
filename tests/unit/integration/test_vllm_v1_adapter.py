"""The module vLLM's built-in LMCacheConnectorV1 imports: every call that connector makes on its
engine exists here with a signature that accepts it (read from vLLM's installed source)."""

import ast
import inspect

import pytest

lmcache_connector = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector")

from lmcache.integration.vllm import connector_impl  # noqa: E402
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl  # noqa: E402


def _engine_calls() -> dict[str, ast.Call]:
    """``self._lmcache_engine.<name>(...)`` calls (also through a local alias such as
    ``engine = self._lmcache_engine``) and ``getattr``/``hasattr`` look-ups of ``"<name>"`` on it,
    in vLLM's LMCacheConnectorV1."""
    tree = ast.parse(inspect.getsource(lmcache_connector))
    aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and isinstance(node.value, ast.Attribute) and node.value.attr == "_lmcache_engine"
               for t in node.targets if isinstance(t, ast.Name)}

    def is_engine(expr) -> bool:
        return (isinstance(expr, ast.Attribute) and expr.attr == "_lmcache_engine") or (
            isinstance(expr, ast.Name) and expr.id in aliases)

    calls: dict[str, ast.Call] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_engine(node.func.value):
            calls[node.func.attr] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
            obj, name = node.args[0], node.args[1]
            if is_engine(obj) and isinstance(name, ast.Constant):
                calls.setdefault(name.value, None)
    return calls


def test_stock_connector_imports_this_module_and_class():
    src = inspect.getsource(lmcache_connector)
    assert "from lmcache.integration.vllm.vllm_v1_adapter import" in src
    assert "LMCacheConnectorV1Impl as LMCacheConnectorLatestImpl" in src
    assert "cls(vllm_config, role, self)" in src
    assert issubclass(LMCacheConnectorV1Impl, connector_impl.LMCacheConnectorV1Impl)
    params = list(inspect.signature(LMCacheConnectorV1Impl.__init__).parameters)
    assert params == ["self", "vllm_config", "role", "parent"]


def test_every_call_of_the_stock_connector_is_accepted():
    calls = _engine_calls()
    expected = {"register_kv_caches", "bind_connector_metadata", "start_load_kv",
                "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_finished",
                "get_block_ids_with_load_errors", "get_kv_events", "get_num_new_matched_tokens",
                "update_state_after_alloc", "build_connector_meta", "request_finished"}
    assert expected <= set(calls), f"vLLM's connector changed: {sorted(calls)}"
    # looked up with hasattr only as compat fallbacks of older LMCache engines: attributes it sets
    calls.pop("current_layer", None)
    calls.pop("layerwise_retrievers", None)
    for name, call in calls.items():
        method = getattr(LMCacheConnectorV1Impl, name, None)
        assert callable(method), f"LMCacheConnectorV1Impl lacks {name}"
        if call is None:
            continue
        sig = inspect.signature(method)
        args = [object()] * len(call.args)
        kwargs = {kw.arg: object() for kw in call.keywords if kw.arg is not None}
        sig.bind(object(), *args, **kwargs)  # raises TypeError when vLLM's call does not fit


def test_plain_answers_of_the_adapter():
    impl = LMCacheConnectorV1Impl.__new__(LMCacheConnectorV1Impl)
    assert impl.get_finished({"a"}) == (None, None)
    assert impl.get_kv_events() == []
