"""What the command-line tools share: logging set-up and turning user errors
into one-line messages."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from glm_engine import GlmEngineError

LOG_LEVELS = {"verbose": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warning": logging.WARNING, "error": logging.ERROR, "internal_error": logging.ERROR}


def setup_logging(level: str) -> None:
    logging.basicConfig(level=LOG_LEVELS[level], format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_tool(main: Callable[[], None]) -> None:
    """Runs a tool's main; a GlmEngineError becomes `prog: error: message` and exit status 1."""
    try:
        main()
    except GlmEngineError as error:
        print(f"{sys.argv[0].rsplit('/', 1)[-1]}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
