"""`python -m vattn` is the `vattn` command."""

from vattn.cli import main

raise SystemExit(main())
