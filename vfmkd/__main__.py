"""``python -m vfmkd`` runs the ``vfmkd`` command."""

from vfmkd.cli import main

raise SystemExit(main())
