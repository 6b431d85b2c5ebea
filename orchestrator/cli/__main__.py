"""``python -m orchestrator.cli``: the ``itr`` command."""

import sys

from orchestrator.cli import main

sys.exit(main())
