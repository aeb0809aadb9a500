"""``python -m ingest.demo``: the same as ``hm-ingest demo``."""

import sys

from ingest.demo.cli import build_parser, main

sys.exit(main(build_parser().parse_args()))
