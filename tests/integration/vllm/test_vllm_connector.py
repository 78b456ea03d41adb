"""lmcache as vLLM's KV connector, end to end with real vLLM on the CPU."""

CHUNK = 64
EXTRA = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.25}


def tokens_of(report, rnd):
    return [r["token_ids"] for r in report["rounds"][rnd]]


def test_repeated_document_is_served_from_lmcache_with_identical_output(tiny_model, documents, run_vllm):
    """Both connector names: ours by module path and vLLM's built-in ``LMCacheConnectorV1`` by name
    alone (it imports lmcache.integration.vllm.vllm_v1_adapter); same hits, no-cache outputs."""
    prompts = [documents[0] + "\nQuestion: what is this license about?", documents[0] + "\nQuestion: who may copy it?"]
    salted = {"prompt": prompts[0], "cache_salt": "tenant-b"}  # vLLM's per-request isolation
    rounds = [[prompts[0]], [prompts[1]], [prompts[0]], [salted], [salted]]
    base = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": False})
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
        assert [tokens_of(cached, i) for i in range(5)] == [tokens_of(base, i) for i in range(5)]
        hits[connector] = [cached["rounds"][i][0]["num_cached_tokens"] for i in range(5)]
    assert hits["stock"] == hits["dynamic"]
    assert base["rounds"][1][0]["num_cached_tokens"] == 0


def test_corrupted_kv_changes_output_negative_control(tiny_model, documents, run_vllm):
    """Proof that vLLM attends over what lmcache loads: noise in the tier changes the answer."""
    prompt = documents[1] + "\nQuestion: summarise the grant of rights."
    rounds = [[prompt], [prompt]]
    clean = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": True, "extra_config": EXTRA,
                      "max_tokens": 16})
    dirty = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": True, "extra_config": EXTRA,
                      "max_tokens": 16, "corrupt_after_round": 0})
    assert dirty["corrupted"] > 0
    assert dirty["rounds"][1][0]["num_cached_tokens"] > 0
    assert tokens_of(clean, 1) == tokens_of(clean, 0)
    assert tokens_of(dirty, 1) != tokens_of(clean, 1)


def test_cleared_tier_is_a_miss_and_output_unchanged(tiny_model, documents, run_vllm):
    prompt = documents[2] + "\nQuestion: what is a contributor?"
    report = run_vllm({"model": tiny_model, "rounds": [[prompt], [prompt]], "lmcache": True,
                       "extra_config": EXTRA, "clear_cpu_after_round": 0})
    assert report["rounds"][1][0]["num_cached_tokens"] == 0
    assert tokens_of(report, 1) == tokens_of(report, 0)


def test_multiprocess_scheduler_and_worker_apart(tiny_model, documents, run_vllm):
    """vLLM's multi-process mode: the scheduler's LookupClient reaches the worker over ZMQ IPC."""
    prompts = [documents[0] + "\nQuestion: A?", documents[0] + "\nQuestion: B?"]
    rounds = [[prompts[0]], [prompts[1]]]
    base = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": False})
    report = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": True, "extra_config": EXTRA,
                       "multiprocess": True})
    assert report["rounds"][1][0]["num_cached_tokens"] > 0
    assert [tokens_of(report, i) for i in range(2)] == [tokens_of(base, i) for i in range(2)]


def test_producer_never_loads(tiny_model, documents, run_vllm):
    prompt = documents[0] + "\nQuestion: C?"
    report = run_vllm({"model": tiny_model, "rounds": [[prompt], [prompt]], "lmcache": True,
                       "extra_config": EXTRA, "kv_role": "kv_producer"})
    assert report["rounds"][1][0]["num_cached_tokens"] == 0
    assert tokens_of(report, 1) == tokens_of(report, 0)


def test_fresh_process_hits_what_the_first_stored(tiny_model, documents, run_vllm, tmp_path):
    """The disk tier outlives the process: a second vLLM process loads the first one's KV."""
    # save_unfull_chunk: the whole prompt is stored, so the second process takes prompt_len − 1
    # tokens from lmcache and the load ends inside a vLLM block (the case where a wrong page
    # layout would show).
    extra = {**EXTRA, "lmcache.local_disk": str(tmp_path / "disk"), "lmcache.max_local_disk_size": 0.5,
             "lmcache.save_unfull_chunk": True}
    prompt = documents[1] + "\nQuestion: may I sublicense?"
    base = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": False})
    first = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": True, "extra_config": extra})
    assert any((tmp_path / "disk").rglob("*")), "the first process left no chunk on disk"
    # the second process runs vLLM's built-in connector name: both name chunks alike
    second = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": True, "extra_config": extra,
                       "connector": "stock"})
    assert first["rounds"][0][0]["num_cached_tokens"] == 0
    hit = second["rounds"][0][0]["num_cached_tokens"]
    assert hit == second["rounds"][0][0]["prompt_len"] - 1 and hit % 128 != 0
    assert tokens_of(second, 0) == tokens_of(first, 0) == tokens_of(base, 0)
