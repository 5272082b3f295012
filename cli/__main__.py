"""`python -m hqlt.cli ...`: the `hqlt` command."""
import sys

from . import main

sys.exit(main())
