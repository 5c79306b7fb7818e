"""``python -m synthgen``: the ``synthgen`` command line."""

from synthgen.cli import main

main()
