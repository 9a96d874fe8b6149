"""``python -m auto_model.cli``: the ``auto-model`` command line."""

import sys

from auto_model.cli import main

sys.exit(main())
