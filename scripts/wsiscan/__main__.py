"""``python -m wsiscan``: the same as the ``wsiscan`` command."""

import sys

from .cli import main

sys.exit(main())
