#!/usr/bin/env python
"""Multi-round QA through a vLLM OpenAI server with lmcache (thin wrapper).

Same as ``python -m lmcache.experiments.multi_round_qa``; takes Hydra overrides, e.g.
``scripts/multi_round_qa.py users=2 rounds=2 qps=2``.
"""

from lmcache.experiments.multi_round_qa import main

if __name__ == "__main__":
    main()
