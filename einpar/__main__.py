"""`python -m einpar`: the `einpar` command."""

import sys

from .cli import main

sys.exit(main())
