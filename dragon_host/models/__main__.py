"""``python -m dragon_host.models prepare smollm2-135m`` (scripts/setup.sh, Dockerfile, Makefile)."""

import sys

from dragon_host.models.cli import main

sys.exit(main())
