"""``python -m minigpt``: the command line (see ``minigpt.cli``)."""

from minigpt.cli import main

raise SystemExit(main())
