"""`python -m stripefs.metaserver`: run the metadata server."""

import sys

from .server import main

sys.exit(main(sys.argv[1:]))
