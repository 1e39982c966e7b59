"""Where a federation runs besides one process: each runtime in its own module, imported only when chosen (a
runtime's framework is an optional extra, e.g. ``pip install -e '.[flower]'`` for :mod:`tapl.runtimes.flower`)."""
