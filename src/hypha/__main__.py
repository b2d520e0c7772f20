"""``python -m hypha``."""

import sys

from hypha.cli.main import main

sys.exit(main())
