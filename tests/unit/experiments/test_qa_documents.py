"""Documents, questions and prompts of the long-document QA experiment."""

from __future__ import annotations

import pytest

from lmcache.experiments.documents import (
    DEFAULT_QUESTIONS, QUESTION_TEMPLATE, Document, build_requests, load_documents, question_text)


def byte_encode(text: str) -> list[int]:
    """A real, simple encoder: one token per UTF-8 byte, ids 10..265 (below 10 are specials)."""
    return [b + 10 for b in text.encode("utf-8")]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)      # 600 bytes
    (tmp_path / "b.txt").write_text("beta " * 100)       # 500 bytes
    (tmp_path / "b-copy.txt").write_text("beta " * 100)  # same text as b.txt
    (tmp_path / "c.txt").write_text("short")             # 5 bytes
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    return tmp_path


def test_load_sorted_dedup_truncated_with_bos(corpus):
    docs = load_documents(corpus, byte_encode, count=2, max_tokens=50, min_tokens=20,
                          bos_token_id=1)
    assert [d.name for d in docs] == ["a.txt", "b-copy.txt"]
    assert all(d.num_tokens == 50 and d.token_ids[0] == 1 for d in docs)
    assert docs[0].token_ids[1:] == tuple(byte_encode("alpha " * 100)[:49])


def test_load_skips_duplicates_short_files_and_symlinks(corpus):
    docs = load_documents(corpus, byte_encode, count=2, max_tokens=1000, min_tokens=100)
    assert [(d.name, d.num_tokens) for d in docs] == [("a.txt", 600), ("b-copy.txt", 500)]
    with pytest.raises(ValueError, match=r"documents.count=3: only 2 distinct file\(s\) of at least 100"):
        load_documents(corpus, byte_encode, count=3, max_tokens=1000, min_tokens=100)
    docs = load_documents(corpus, byte_encode, count=3, max_tokens=1000, min_tokens=0)
    assert [d.name for d in docs] == ["a.txt", "b-copy.txt", "c.txt"]


def test_load_named_files_in_given_order(corpus):
    docs = load_documents(corpus, byte_encode, count=2, max_tokens=10, names=["c.txt", "b.txt"])
    assert [d.name for d in docs] == ["c.txt", "b.txt"]
    assert docs[0].token_ids == tuple(byte_encode("short"))
    with pytest.raises(ValueError, match="no such file"):
        load_documents(corpus, byte_encode, count=1, max_tokens=10, names=["zzz"])


def test_load_rejects_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="documents.count=0"):
        load_documents(corpus, byte_encode, count=0, max_tokens=10)
    with pytest.raises(ValueError, match="documents.max_tokens=1"):
        load_documents(corpus, byte_encode, count=1, max_tokens=1)
    with pytest.raises(ValueError, match="documents.min_tokens=20 exceeds documents.max_tokens=10"):
        load_documents(corpus, byte_encode, count=1, max_tokens=10, min_tokens=20)
    with pytest.raises(ValueError, match="is not a directory"):
        load_documents(tmp_path / "missing", byte_encode, count=1, max_tokens=10)


def test_load_real_license_texts():
    docs = load_documents("/usr/share/common-licenses", byte_encode, count=3, max_tokens=4000,
                          min_tokens=1000, bos_token_id=1)
    names = [d.name for d in docs]
    assert names == sorted(names) and len(set(names)) == 3
    assert all(1000 <= d.num_tokens <= 4000 for d in docs)


def test_question_text_variants():
    assert question_text(0) == DEFAULT_QUESTIONS[0]
    n = len(DEFAULT_QUESTIONS)
    assert question_text(n + 1) == f"{DEFAULT_QUESTIONS[1]} (variant 1)"
    assert len({question_text(i) for i in range(3 * n)}) == 3 * n
    with pytest.raises(ValueError, match="at least one question"):
        question_text(0, [])
    with pytest.raises(ValueError, match="question index -1"):
        question_text(-1)


def test_build_requests_rounds_and_shared_prefix():
    docs = [Document("d0", (1, 11, 12, 13)), Document("d1", (1, 21, 22))]
    reqs = build_requests(docs, byte_encode, questions_per_document=3, questions=["Q?", "R?"])
    assert [(r.round, r.doc_index, r.question_index) for r in reqs] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1), (2, 0, 2), (2, 1, 2)]
    assert [r.question for r in reqs[::2]] == ["Q?", "R?", "Q? (variant 1)"]
    for r in reqs:
        doc = docs[r.doc_index]
        assert r.prefix_len == doc.num_tokens
        assert r.prompt_token_ids[: r.prefix_len] == doc.token_ids
        assert r.prompt_token_ids[r.prefix_len:] == tuple(
            byte_encode(QUESTION_TEMPLATE.format(question=r.question)))
        assert r.request_key == f"{doc.name}#q{r.question_index}"
    assert len({r.request_key for r in reqs}) == 6


def test_build_requests_rejects_bad_arguments():
    docs = [Document("d0", (1, 2))]
    with pytest.raises(ValueError, match="at least one document"):
        build_requests([], byte_encode, 1)
    with pytest.raises(ValueError, match="questions.per_document=0"):
        build_requests(docs, byte_encode, 0)
    with pytest.raises(ValueError, match="'{question}' field"):
        build_requests(docs, byte_encode, 1, template="no field")
