"""`python -m loadtests.sweep` (also `crs-load sweep`)."""

import sys

from loadtests.sweep.run import main

sys.exit(main())
