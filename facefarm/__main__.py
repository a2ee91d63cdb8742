"""``python -m facefarm``: the same CLI as the ``facefarm`` script."""

import sys

from facefarm.cli import main

sys.exit(main())
