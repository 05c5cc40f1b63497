"""`python -m server.cli`: the same as `crs` (how the dev stack and the tests start nodes)."""

from server.cli.main import main

raise SystemExit(main())
