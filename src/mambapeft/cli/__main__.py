"""``python -m mambapeft.cli``: the same command line as the ``mambapeft`` script."""
import sys

from . import main

sys.exit(main())
