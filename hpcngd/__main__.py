"""``python -m hpcngd`` is the ``hpcngd`` command."""

import sys

from hpcngd.cli import main

sys.exit(main())
