"""Documents, questions and prompts of the long-document QA experiment.

A prompt is ``document tokens + question tokens``, built at the token level so that every
question about one document shares the document's token ids exactly (the shared prefix that a
KV cache can reuse). Round ``r`` asks question ``r`` of every document; round 0 is the cold
round (each document seen for the first time), later rounds are warm.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_QUESTIONS = (
    "What does this license allow a user to do?",
    "Under which conditions may the work be redistributed?",
    "Does the license give any warranty?",
    "What must be kept when the work is copied?",
    "May the work be used in a commercial product?",
    "What happens when the terms of the license are broken?",
    "Who holds the copyright of the work?",
    "Does the license require the source code to be shared?",
)
QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"

Encoder = Callable[[str], list[int]]
"""Text → token ids, with no special tokens added."""


@dataclass(frozen=True)
class Document:
    """One document: its file name and its token ids (``bos`` first when the model has one)."""

    name: str
    token_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class QARequest:
    """One prompt: question ``question_index`` about document ``doc_index``, asked in ``round``.

    ``prompt_token_ids = document.token_ids + question token ids``; ``prefix_len`` is the
    document's length (the part shared with every other question about that document).
    """

    round: int
    doc_index: int
    doc_name: str
    question_index: int
    question: str
    prompt_token_ids: tuple[int, ...]
    prefix_len: int

    @property
    def request_key(self) -> str:
        """A stable name of this request, the same in every run: ``<doc>#q<index>``."""
        return f"{self.doc_name}#q{self.question_index}"


def load_documents(
    directory: str | os.PathLike,
    encode: Encoder,
    count: int,
    max_tokens: int,
    min_tokens: int = 0,
    names: Sequence[str] | None = None,
    bos_token_id: int | None = None,
) -> list[Document]:
    """Read up to ``count`` documents from ``directory``, each cut to ``max_tokens`` tokens.

    Files are taken in the order of ``names`` (or sorted by name), skipping symlinks, files
    whose text is identical to one already taken (``GPL`` and ``GPL-3`` are the same text) and
    files shorter than ``min_tokens`` tokens. ``bos_token_id`` (when not None) is the first token
    of every document and counts toward ``max_tokens``.

    Raises:
        ValueError: ``count`` < 1, ``max_tokens`` < 2, ``min_tokens`` > ``max_tokens``, the
            directory is missing, a named file is missing, or fewer than ``count`` documents
            qualify (the message says how many did).
    """
    if count < 1:
        raise ValueError(f"documents.count={count}: expected at least 1")
    if max_tokens < 2:
        raise ValueError(f"documents.max_tokens={max_tokens}: expected at least 2")
    if min_tokens > max_tokens:
        raise ValueError(f"documents.min_tokens={min_tokens} exceeds documents.max_tokens={max_tokens}")
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"documents.dir={str(root)!r} is not a directory")
    if names is not None:
        paths = [root / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"documents.names: no such file(s) {missing}")
    else:
        paths = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink())
    head = [] if bos_token_id is None else [int(bos_token_id)]
    docs: list[Document] = []
    seen: set[str] = set()
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        ids = (head + list(encode(text)))[:max_tokens]
        if len(ids) < min_tokens:
            continue
        docs.append(Document(name=path.name, token_ids=tuple(int(t) for t in ids)))
        if len(docs) == count:
            return docs
    raise ValueError(
        f"documents.count={count}: only {len(docs)} distinct file(s) of at least "
        f"{min_tokens} tokens in {str(root)!r}")


def question_text(index: int, questions: Sequence[str] = DEFAULT_QUESTIONS) -> str:
    """Question ``index``; past the end of ``questions`` they repeat with a ``(variant k)`` suffix,
    so that every index gives a distinct question."""
    if not questions:
        raise ValueError("questions: expected at least one question text")
    if index < 0:
        raise ValueError(f"question index {index}: expected >= 0")
    base = questions[index % len(questions)]
    variant = index // len(questions)
    return base if variant == 0 else f"{base} (variant {variant})"


def build_requests(
    documents: Sequence[Document],
    encode: Encoder,
    questions_per_document: int,
    questions: Sequence[str] = DEFAULT_QUESTIONS,
    template: str = QUESTION_TEMPLATE,
) -> list[QARequest]:
    """All prompts of the experiment in the order they are sent: round by round, and in each
    round document by document (round ``r`` = question ``r`` of every document).

    Raises:
        ValueError: no documents, ``questions_per_document`` < 1, or a template without
            ``{question}``.
    """
    if not documents:
        raise ValueError("build_requests: expected at least one document")
    if questions_per_document < 1:
        raise ValueError(f"questions.per_document={questions_per_document}: expected at least 1")
    if "{question}" not in template:
        raise ValueError(f"questions.template={template!r}: expected a '{{question}}' field")
    requests: list[QARequest] = []
    for q in range(questions_per_document):
        text = question_text(q, questions)
        q_ids = tuple(int(t) for t in encode(template.format(question=text)))
        for d, doc in enumerate(documents):
            requests.append(QARequest(
                round=q, doc_index=d, doc_name=doc.name, question_index=q, question=text,
                prompt_token_ids=doc.token_ids + q_ids, prefix_len=doc.num_tokens))
    return requests
