"""Prompts of the RAG blend experiment: documents retrieved in any subset and order.

A query's prompt is built at the token level (as LMCache's CacheBlend examples do, so that no
BPE merge crosses a boundary)::

    [bos] + system prompt + SEP + doc_a + SEP + doc_b + ... + SEP + question

with ``SEP`` the token ids of ``blend_special_str`` (``" # # "``). Each query takes a random
(seeded) subset of the documents, of ``min_docs..max_docs`` documents, in random order, and its
own question. The warm-up prompts are the documents alone (each at position 0), as CacheBlend
users fill the cache, so that a query finds every document cached at another position.
Repeat ``r >= 1`` of a query salts token 1 of its system prompt
(:func:`lmcache.experiments.interleave.salt_token`): the system segment and every prefix
chunk are new to every cache, the documents are not.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache.experiments.documents import question_text
from lmcache.experiments.interleave import salt_token


@dataclass(frozen=True)
class RagQuery:
    """One query: documents ``doc_order`` (indices) in that order, question ``question``.

    ``prompt_token_ids`` as in the module docstring; ``cached_tokens`` = the tokens of its
    documents (what a warm CacheBlend cache holds), ``uncached_tokens`` = the others (system
    prompt, separators, question)."""

    index: int
    doc_order: tuple[int, ...]
    question: str
    prompt_token_ids: tuple[int, ...]
    cached_tokens: int

    @property
    def request_key(self) -> str:
        """``q<index>:<doc order>``, e.g. ``q3:2-0-1``."""
        return f"q{self.index}:{'-'.join(str(d) for d in self.doc_order)}"

    @property
    def uncached_tokens(self) -> int:
        return len(self.prompt_token_ids) - self.cached_tokens


def contains(tokens: Sequence[int], pattern: Sequence[int]) -> bool:
    """Whether ``pattern`` occurs in ``tokens`` as a contiguous run."""
    k = len(pattern)
    return k > 0 and any(list(tokens[i:i + k]) == list(pattern)
                         for i in range(len(tokens) - k + 1))


def build_queries(docs: Sequence[Sequence[int]], system: Sequence[int],
                  separator: Sequence[int], questions: Sequence[tuple[str, Sequence[int]]],
                  count: int, min_docs: int, max_docs: int, seed: int) -> list[RagQuery]:
    """``count`` queries over ``docs`` (token id lists, no bos), seeded by ``seed``.

    Args:
        system: ``[bos] + system prompt`` token ids (token 1 is salted by repeats).
        separator: the separator's token ids.
        questions: one ``(text, token ids)`` per query (``count`` of them), from
            :func:`question_tokens`.

    Raises:
        ValueError: no documents, a bad ``count``/``min_docs``/``max_docs`` (named), a system
            prompt shorter than 2 tokens, or a document or question holding the separator
            (the segments would split differently than the documents).
    """
    if not docs:
        raise ValueError("rag_blend: expected at least one document")
    if count < 1:
        raise ValueError(f"queries.count={count}: expected at least 1")
    if not 1 <= min_docs <= max_docs <= len(docs):
        raise ValueError(f"queries.min_docs={min_docs}, queries.max_docs={max_docs}: expected "
                         f"1 <= min_docs <= max_docs <= documents.count={len(docs)}")
    if len(system) < 2:
        raise ValueError(f"the system prompt has {len(system)} tokens; expected at least 2 "
                         "(bos + text: token 1 is salted per repeat)")
    if len(questions) != count:
        raise ValueError(f"expected {count} questions, got {len(questions)}")
    for name, part in [*((f"document {i}", d) for i, d in enumerate(docs)),
                       *((f"question {i}", q) for i, (_, q) in enumerate(questions)),
                       ("system prompt", system)]:
        if contains(part, separator):
            raise ValueError(f"{name} holds the separator tokens {list(separator)}; choose "
                             "another blend_special_str")
    rng = random.Random(seed)
    out = []
    for q in range(count):
        order = tuple(rng.sample(range(len(docs)), rng.randint(min_docs, max_docs)))
        ids = list(system)
        for d in order:
            ids += list(separator) + list(docs[d])
        ids += list(separator) + list(questions[q][1])
        out.append(RagQuery(index=q, doc_order=order, question=questions[q][0],
                            prompt_token_ids=tuple(ids),
                            cached_tokens=sum(len(docs[d]) for d in order)))
    return out


def question_tokens(encode, template: str, count: int) -> list[tuple[str, list[int]]]:
    """``count`` distinct questions ``(text, token ids)``: question ``i`` of
    :func:`lmcache.experiments.documents.question_text` in ``template`` (``{question}``).

    Raises:
        ValueError: a template without ``{question}``.
    """
    if "{question}" not in template:
        raise ValueError(f"queries.template={template!r}: expected a '{{question}}' field")
    texts = [question_text(i) for i in range(count)]
    return [(t, list(encode(template.format(question=t)))) for t in texts]


def salted(prompt: Sequence[int], repeat: int, vocab_size: int,
           separator: Sequence[int]) -> list[int]:
    """``prompt`` with token 1 salted for ``repeat`` (>= 1; 0 = unchanged); a salt that is a
    separator token is moved on, so the segments stay the same."""
    ids = list(prompt)
    if repeat:
        token = salt_token(ids[1], repeat, vocab_size)
        while token in separator:
            token = salt_token(token, 1, vocab_size)
        ids[1] = token
    return ids
