"""Serves an engine over HTTP with OpenAI's API (/v1/completions,
/v1/chat/completions, /v1/models), plus /tokenize, /detokenize, /health and /metrics:
one engine loop, in a process of its own, batches every client's requests in flight
with prefix caching on (--no_prefix_caching turns it off)
(glm_engine/serving/openai_server.py, glm_engine/serving/engine_process.py).
Tensor-parallel engines: `torchrun --nproc_per_node N serve.py ...`; rank 0 serves
HTTP, every rank steps the engine."""

from __future__ import annotations

import argparse
import functools
import math
import signal
import socket
from pathlib import Path

# Light imports only up here: --help answers without loading torch; main() imports the rest.
from glm_engine import GlmEngineError
from glm_engine.tools.cli import (add_scheduler_arguments, add_session_arguments, kv_cache_options, run_tool,
                                  scheduler_options, setup_logging, speculative_options)


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
    add_session_arguments(parser, prefix_caching=True)  # served prompts often share a system prompt
    return parser.parse_args(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), for the server to listen on: a taken port is
    refused in one line before the engine loads."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind)
    except (OSError, OverflowError) as error:
        raise GlmEngineError(f"cannot listen on {host}:{port}: {error}; check --host and --port") from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over old TIME_WAITs
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise GlmEngineError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port or stop "
                             "what uses it") from None
    return listener


def follow_rank0(session_factory: functools.partial) -> None:
    """A tensor-parallel rank other than 0: loads its part of the engine and steps with
    rank 0's engine loop until that loop ends (rank 0 alone decides when: a stop signal
    reaches every rank of a torchrun launch, and rank 0 drains its requests first)."""
    from glm_engine.serving.engine_loop import follow

    session = session_factory()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follow(session)


def main() -> None:
    args = parse_arguments()
    setup_logging(args.log_level)
    if args.max_queue < 1:
        raise GlmEngineError(f"--max_queue must be at least 1, got {args.max_queue}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise GlmEngineError(f"--shutdown_timeout must be a finite number of seconds, 0 or more, got "
                             f"{args.shutdown_timeout}")
    from glm_engine.runtime.distributed import launch_from_environment

    rank = launch_from_environment().rank
    listener = listening_socket(args.host, args.port) if rank == 0 else None
    from glm_engine.engine_format.engine import engine_configs
    from glm_engine.serving.openai_server import create_app, run_server
    from glm_engine.serving.engine_process import EngineProcess
    from glm_engine.text.tokenizer import has_tokenizer, load_tokenizer
    from model import load_session

    engine_configs(args.engine_dir)  # a clear error before any other work
    tokenizer_dir = Path(args.tokenizer_dir or args.engine_dir)
    if not has_tokenizer(tokenizer_dir):
        raise GlmEngineError(f"no tokenizer.model or tokenizer.json in {tokenizer_dir}: the API takes "
                             "text; pass --tokenizer_dir")
    tokenizer = load_tokenizer(tokenizer_dir)
    # Both run in the engine process: module-level functions, so that they pickle however serve.py was started.
    session_factory = functools.partial(load_session, args.engine_dir, args.device, tokenizer=tokenizer,
                                        **kv_cache_options(args), **speculative_options(args),
                                        **scheduler_options(args))
    if rank > 0:
        follow_rank0(session_factory)
        return
    engine = EngineProcess(session_factory, args.max_queue,
                           process_setup=functools.partial(setup_logging, args.log_level))
    try:
        app = create_app(engine, tokenizer, args.model_name or Path(args.engine_dir).resolve().name,
                         args.shutdown_timeout)
        run_server(app, engine, listener, args.shutdown_timeout, args.log_level)
    finally:
        engine.close(0.0)  # the server stopped another way: the engine process must not outlive it


if __name__ == "__main__":
    run_tool(main)
