"""``python -m moec``: the ``moec`` command (as ``torchrun -m moec`` runs it on every rank)."""

from moec.cli import main

main()
