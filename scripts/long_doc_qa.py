#!/usr/bin/env python
"""Long-document QA through vLLM with and without lmcache (thin wrapper).

Same as ``python -m lmcache.experiments.long_doc_qa``; takes Hydra overrides, e.g.
``scripts/long_doc_qa.py documents.count=2 questions.per_document=2``.
"""

from lmcache.experiments.long_doc_qa import main

if __name__ == "__main__":
    main()
