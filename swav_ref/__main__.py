"""``python -m swav_ref`` is the same as the ``swav-ref`` command."""

from swav_ref.cli import main

raise SystemExit(main())
