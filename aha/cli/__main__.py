"""``python -m aha.cli`` runs the ``aha`` command (also ``accelerate launch -m aha.cli train ...``)."""

from aha.cli import main

main()
