"""``python -m venna.cli``: the ``venna`` command without its console script."""

import sys

from venna.cli.commands import main

sys.exit(main())
