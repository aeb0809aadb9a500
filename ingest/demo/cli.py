"""``hm-ingest demo [--duration S] [--output DIR] [--vehicles N]``: arguments and exit codes.

Exit codes: 0 the run completed and every check held; 1 a part failed, the daemon did not catch
up, or a check failed (the summary says which); 2 bad arguments or Mosquitto missing (with how to
install it); 130 interrupted by Ctrl-C or SIGTERM (everything started is stopped either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ingest.argtypes import positive, probability
from ingest.demo.emulator import EmulatorError
from ingest.demo.run import DemoError, Options, run
from ingest.demo.workdir import WorkdirError
from ingest.testing.broker import INSTALL_HINT, BrokerStartError

EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULTS = Options()

INSTALL_HELP = """\
hm-ingest demo: Mosquitto (the MQTT broker the demo runs locally) is not installed.
Install it with:
  sudo apt-get install -y mosquitto mosquitto-clients   # Debian/Ubuntu
  brew install mosquitto                                 # macOS
then run the demo again (`make install` does the apt-get step when run as root)."""


_POSITIVE_NUMBER = positive("a number")


def _vehicles(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 10000, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=_POSITIVE_NUMBER,
        default=DEFAULTS.duration_s,
        metavar="SECONDS",
        help=f"how long the vehicles stream (default {DEFAULTS.duration_s:g}; Ctrl-C ends early)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULTS.output,
        metavar="DIR",
        help=f"folder for data, logs, certificates and state (default ./{DEFAULTS.output}); "
        "a later demo replaces what an earlier one left there",
    )
    parser.add_argument(
        "--vehicles",
        type=_vehicles,
        default=DEFAULTS.vehicles,
        metavar="N",
        help=f"sample fleet size; every 4th VIN ends in R and is rejected "
        f"(default {DEFAULTS.vehicles})",
    )
    parser.add_argument(
        "--rate",
        type=_POSITIVE_NUMBER,
        default=DEFAULTS.vehicle_rate,
        metavar="N",
        help=f"MQTT messages/s per approved vehicle (default {DEFAULTS.vehicle_rate:g})",
    )
    parser.add_argument(
        "--bad-rate",
        type=probability,
        default=DEFAULTS.bad_rate,
        metavar="P",
        help=f"share of messages damaged on purpose (default {DEFAULTS.bad_rate})",
    )
    parser.add_argument(
        "--malformed-rate",
        type=probability,
        default=DEFAULTS.malformed_rate,
        metavar="P",
        help=f"share of messages that are not JSON at all (default {DEFAULTS.malformed_rate})",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="stream seed (default %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hm-ingest demo",
        description="Run Mosquitto, the HM emulator and the daemon on this machine and show "
        "fleet telemetry landing in Parquet.",
    )
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    options = Options(
        duration_s=args.duration,
        output=args.output,
        vehicles=args.vehicles,
        vehicle_rate=args.rate,
        bad_rate=args.bad_rate,
        malformed_rate=args.malformed_rate,
        seed=args.seed,
    )
    try:
        return run(options)
    except BrokerStartError as exc:
        if str(exc) == INSTALL_HINT:
            print(INSTALL_HELP, file=sys.stderr)
            return EXIT_USAGE
        print(f"hm-ingest demo: could not start mosquitto: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except WorkdirError as exc:
        print(f"hm-ingest demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DemoError, EmulatorError) as exc:
        print(f"hm-ingest demo failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
