"""`python -m autoshard ...`: the command line (see autoshard/cli.py)."""

from autoshard.cli import main

raise SystemExit(main())
