"""`python -m loadtests.bench` (also `./crsw bench`, `crs-load bench`)."""

import sys

from loadtests.bench.run import main

sys.exit(main())
