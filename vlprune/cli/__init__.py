"""The ``vlprune`` command line (``vlprune = "vlprune.cli:main"``; also ``python -m vlprune.cli``).

One module per command (:mod:`~vlprune.cli.bench`, :mod:`~vlprune.cli.describe`,
:mod:`~vlprune.cli.eval_imagenet`, :mod:`~vlprune.cli.eval_vqa`, :mod:`~vlprune.cli.viz`), the
shared argparse helpers in :mod:`~vlprune.cli.args`, and the parser, the dispatch and the
exit codes in :mod:`~vlprune.cli.main`. Only this package exits the process; the library
(:mod:`vlprune.eval`, :mod:`vlprune.models`, ...) raises exceptions that it turns into
messages and exit codes.
"""

from .main import main, make_parser

__all__ = ["main", "make_parser"]
