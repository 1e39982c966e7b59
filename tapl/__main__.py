"""``python -m tapl``: the ``tapl`` command."""

from tapl.cli import main

main()
