"""``python -m bertfast``: the ``bertfast`` command (also ``torchrun -m bertfast pretrain ...``)."""

from bertfast.cli import main

raise SystemExit(main())
