"""lmcache as vLLM's KV connector, end to end with real vLLM on the CPU.

Every vLLM run is a fresh process (see tests/integration/conftest.py). Runs with the same engine
settings are shared: one run without lmcache gives the reference output of every prompt here, one
run with lmcache serves both the noise control and the cleared-tier test."""

import pytest

CHUNK = 64
EXTRA = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.25}
# the prompts are built from the session's ``documents`` by index: (document, question)
REPEATED = [(0, "what is this license about?"), (0, "who may copy it?")]
APART = [(0, "A?"), (0, "B?")]
FRESH = (1, "may I sublicense?")


def ask(documents, doc_question) -> str:
    doc, question = doc_question
    return documents[doc] + "\nQuestion: " + question


def tokens_of(report, rnd):
    return [r["token_ids"] for r in report["rounds"][rnd]]


@pytest.fixture(scope="module")
def base(tiny_model, documents, vllm_runner, tmp_path_factory) -> dict[str, list[int]]:
    """prompt -> greedy output tokens (8) of vLLM without lmcache, one prompt per generate call
    (as in the lmcache runs; prefix caching is off, so earlier rounds do not change a later one)."""
    prompts = list(dict.fromkeys(ask(documents, q) for q in [*REPEATED, *APART, FRESH]))
    report = vllm_runner({"model": tiny_model, "rounds": [[p] for p in prompts], "lmcache": False},
                         tmp_path_factory.mktemp("base"))
    assert all(r[0]["num_cached_tokens"] == 0 for r in report["rounds"])  # nothing cached without lmcache
    return {p: report["rounds"][i][0]["token_ids"] for i, p in enumerate(prompts)}


def test_repeated_document_is_served_from_lmcache_with_identical_output(tiny_model, documents, run_vllm,
                                                                      base):
    """Both connector names: ours by module path and vLLM's built-in ``LMCacheConnectorV1`` by name
    alone (it imports lmcache.integration.vllm.vllm_v1_adapter); same hits, no-cache outputs."""
    prompts = [ask(documents, q) for q in REPEATED]
    salted = {"prompt": prompts[0], "cache_salt": "tenant-b"}  # vLLM's per-request isolation
    rounds = [[prompts[0]], [prompts[1]], [prompts[0]], [salted], [salted]]
    # without lmcache (and without prefix caching) the salt changes nothing
    expected = [[base[p]] for p in (prompts[0], prompts[1], prompts[0], prompts[0], prompts[0])]
    hits = {}
    for connector in ("dynamic", "stock"):
        cached = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": True, "extra_config": EXTRA,
                           "connector": connector})
        first, second, third = (cached["rounds"][i][0] for i in range(3))
        assert first["num_cached_tokens"] == 0
        # the document is a shared prefix: every whole chunk of it is a hit on the second question
        assert second["num_cached_tokens"] >= (len(documents[0]) // 8 // CHUNK - 1) * CHUNK > 0
        assert second["num_cached_tokens"] % CHUNK == 0
        # the exact prompt again: all but the last token come from lmcache
        assert third["num_cached_tokens"] == third["prompt_len"] - 1 or third["num_cached_tokens"] == \
            third["prompt_len"] // CHUNK * CHUNK
        # same tokens, another cache_salt: never the unsalted KV; then its own KV
        salted_first, salted_again = cached["rounds"][3][0], cached["rounds"][4][0]
        assert salted_first["num_cached_tokens"] == 0
        assert salted_again["num_cached_tokens"] == third["num_cached_tokens"] > 0
        assert [tokens_of(cached, i) for i in range(5)] == expected
        hits[connector] = [cached["rounds"][i][0]["num_cached_tokens"] for i in range(5)]
    assert hits["stock"] == hits["dynamic"]


@pytest.fixture(scope="module")
def controls(tiny_model, documents, vllm_runner, tmp_path_factory) -> dict:
    """One lmcache run for both controls: rounds 0-2 ask documents[1] (after round 1 every chunk
    of the CPU tier is overwritten with noise), rounds 3-4 ask documents[2] (the tier is cleared
    after round 3)."""
    noisy = documents[1] + "\nQuestion: summarise the grant of rights."
    cleared = documents[2] + "\nQuestion: what is a contributor?"
    return vllm_runner({"model": tiny_model, "rounds": [[noisy], [noisy], [noisy], [cleared], [cleared]],
                        "lmcache": True, "extra_config": EXTRA, "max_tokens": 16,
                        "corrupt_after_round": 1, "clear_cpu_after_round": 3},
                       tmp_path_factory.mktemp("controls"))


def test_corrupted_kv_changes_output_negative_control(controls):
    """Proof that vLLM attends over what lmcache loads: noise in the tier changes the answer."""
    assert controls["corrupted"] > 0
    assert controls["rounds"][1][0]["num_cached_tokens"] > 0  # a clean hit: the same answer
    assert tokens_of(controls, 1) == tokens_of(controls, 0)
    assert controls["rounds"][2][0]["num_cached_tokens"] > 0  # a hit on the noise: another answer
    assert tokens_of(controls, 2) != tokens_of(controls, 1)


def test_cleared_tier_is_a_miss_and_output_unchanged(controls):
    assert controls["rounds"][3][0]["num_cached_tokens"] == 0
    assert controls["rounds"][4][0]["num_cached_tokens"] == 0
    assert tokens_of(controls, 4) == tokens_of(controls, 3)


def test_multiprocess_scheduler_and_worker_apart(tiny_model, documents, run_vllm, base):
    """vLLM's multi-process mode: the scheduler's LookupClient reaches the worker over ZMQ IPC.
    (The only multi-process vLLM test: an exec'd interpreter, not a fork.)"""
    prompts = [ask(documents, q) for q in APART]
    rounds = [[prompts[0]], [prompts[1]]]
    report = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": True, "extra_config": EXTRA,
                       "multiprocess": True})
    assert report["rounds"][1][0]["num_cached_tokens"] > 0
    assert [tokens_of(report, i) for i in range(2)] == [[base[p]] for p in prompts]


def test_producer_never_loads(tiny_model, documents, run_vllm):
    prompt = documents[0] + "\nQuestion: C?"
    report = run_vllm({"model": tiny_model, "rounds": [[prompt], [prompt]], "lmcache": True,
                       "extra_config": EXTRA, "kv_role": "kv_producer"})
    assert report["rounds"][1][0]["num_cached_tokens"] == 0
    assert tokens_of(report, 1) == tokens_of(report, 0)


def test_fresh_process_hits_what_the_first_stored(tiny_model, documents, run_vllm, tmp_path, base):
    """The disk tier outlives the process: a second vLLM process loads the first one's KV."""
    # save_unfull_chunk: the whole prompt is stored, so the second process takes prompt_len − 1
    # tokens from lmcache and the load ends inside a vLLM block (the case where a wrong page
    # layout would show).
    extra = {**EXTRA, "lmcache.local_disk": str(tmp_path / "disk"), "lmcache.max_local_disk_size": 0.5,
             "lmcache.save_unfull_chunk": True}
    prompt = ask(documents, FRESH)
    first = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": True, "extra_config": extra})
    assert any((tmp_path / "disk").rglob("*")), "the first process left no chunk on disk"
    # the second process runs vLLM's built-in connector name: both name chunks alike
    second = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": True, "extra_config": extra,
                       "connector": "stock"})
    assert first["rounds"][0][0]["num_cached_tokens"] == 0
    hit = second["rounds"][0][0]["num_cached_tokens"]
    assert hit == second["rounds"][0][0]["prompt_len"] - 1 and hit % 128 != 0
    assert tokens_of(second, 0) == tokens_of(first, 0) == [base[prompt]]
