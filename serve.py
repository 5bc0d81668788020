"""Serves an engine over HTTP with OpenAI's API (/v1/completions,
/v1/chat/completions, /v1/models), plus /health and /metrics: one engine loop, in a
process of its own, batches every client's requests in flight
(glm_engine/serving/openai_server.py, glm_engine/serving/engine_process.py)."""

from __future__ import annotations

import argparse
import functools
import signal
from pathlib import Path

# Light imports only up here: --help answers without loading torch; main() imports the rest.
from glm_engine import GlmEngineError
from glm_engine.tools.cli import (add_scheduler_arguments, add_session_arguments, kv_cache_options, run_tool,
                            scheduler_options, setup_logging)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine_dir", type=str, default="trtModel", help="the engine (default: %(default)s)")
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="(default: the engine directory)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--model_name", type=str, default=None,
                        help="the model id clients send (default: the engine directory's name)")
    parser.add_argument("--max_queue", type=int, default=1024,
                        help="requests that may wait for a slot; more get HTTP 429 (default: %(default)s)")
    parser.add_argument("--shutdown_timeout", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, seconds running requests get to finish before they end with an "
                             "error (default: %(default)s)")
    add_scheduler_arguments(parser)
    add_session_arguments(parser)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_arguments()
    setup_logging(args.log_level)
    import uvicorn

    from glm_engine.engine_format.engine import engine_configs
    from glm_engine.serving.openai_server import create_app
    from glm_engine.serving.engine_process import EngineProcess
    from glm_engine.text.tokenizer import ChatGLMTokenizer
    from model import load_session

    _, build_config = engine_configs(args.engine_dir)  # a clear error before any other work
    if build_config.world_size > 1:
        raise GlmEngineError(f"serve.py runs one-GPU engines; {args.engine_dir} has {build_config.world_size} ranks")
    if args.max_queue < 1:
        raise GlmEngineError(f"--max_queue must be at least 1, got {args.max_queue}")
    tokenizer_dir = Path(args.tokenizer_dir or args.engine_dir)
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise GlmEngineError(f"no tokenizer.model in {tokenizer_dir}: the API takes text; pass --tokenizer_dir")
    tokenizer = ChatGLMTokenizer.from_dir(tokenizer_dir)
    # Both run in the engine process: module-level functions, so that they pickle however serve.py was started.
    session_factory = functools.partial(load_session, args.engine_dir, args.device, tokenizer=tokenizer,
                                        **kv_cache_options(args), **scheduler_options(args))
    engine = EngineProcess(session_factory, args.max_queue,
                           process_setup=functools.partial(setup_logging, args.log_level))
    app = create_app(engine, tokenizer, args.model_name or Path(args.engine_dir).resolve().name,
                     args.shutdown_timeout)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to the handler it
    # found: from here on that handler is this no-op, so a graceful stop exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level if args.log_level != "verbose"
                    else "debug", timeout_graceful_shutdown=args.shutdown_timeout + 5)
    finally:
        engine.close(0.0)  # uvicorn never started (port taken): the engine process must not outlive it


if __name__ == "__main__":
    run_tool(main)
