"""`python -m tritongpt ...` is the `tritongpt` command."""

import sys

from tritongpt.cli import main

sys.exit(main())
