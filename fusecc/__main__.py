"""``python -m fusecc``: the fusecc command (fusecc/cli.py)."""

import sys

from .cli import main

sys.exit(main())
