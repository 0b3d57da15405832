"""``python -m dragon_vllm.corpus_cli``: the public corpus's command line (``dragon_vllm/corpus/cli.py``)
under the name the docs, the tests and ``dragon-cloud index`` use."""

import sys

from dragon_vllm.corpus.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
