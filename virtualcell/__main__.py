"""``python -m virtualcell``: the same command line as ``virtualcell`` (:func:`virtualcell.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
