"""``python -m embfile``: the same as the ``embfile`` command."""

from embfile.cli import run

run()
