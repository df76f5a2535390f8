"""`python -m stripefs.dataserver ...` runs the data server process."""

import sys

from .server import main

sys.exit(main(sys.argv[1:]))
