"""``python -m gateway.devtools.fake_upstream``: serve the fake upstream (no Django needed)."""

import sys

from gateway.devtools.fake_upstream.server import main

main(sys.argv[1:])
