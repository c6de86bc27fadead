"""``python -m vlprune.cli ARGS`` (e.g. under ``accelerate launch -m vlprune.cli``)."""

import sys

from .main import main

sys.exit(main())
