"""``stepcache serve``: the bundled DreamZero-style model as a policy server for many robots.

Loads the model once and serves sessions over HTTP (see :mod:`stepcache.serving.server` for the
API): each robot opens a session, sends its observation every chunk and gets the actions back. The
chunks of all sessions are batched per denoising step, each session deciding its own steps with
StepCache. The same port speaks openpi's websocket policy protocol at ``/``
(:mod:`stepcache.serving.openpi`): a robot running openpi-client's ``WebsocketClientPolicy`` connects
as it does to an openpi server. Binds to 127.0.0.1 unless ``--host`` says otherwise; ``--port 0`` takes
any free port (the address is printed). ``--api-key`` (or ``$STEPCACHE_API_KEY``) makes every request
carry ``Authorization: Api-Key <key>``; another address than loopback needs a key, or
``--allow-no-api-key``. Needs the ``serve`` extra (``pip install 'stepcache[serve]'``).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
from pathlib import Path

from stepcache.config import shown
from stepcache.tools.common import (
    UsageError,
    add_cache_config_argument,
    add_threads_argument,
    checked_cache_config,
    format_cache_config,
    positive_float,
    positive_int,
    set_torch_threads,
)

logger = logging.getLogger(__name__)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{shown(text)} is not an integer; allowed: 0..65535 (0 = any free port)"
        ) from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: 0..65535 (0 = any free port)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stepcache.serving.engine import DECISIONS, PER_SESSION
    from stepcache.serving.openpi import DEFAULT_MAX_MESSAGE_BYTES
    from stepcache.serving.server import (
        API_KEY_ENV,
        DEFAULT_HOST,
        DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_SESSIONS,
        DEFAULT_PORT,
        DEFAULT_SESSION_TTL_S,
    )

    parser.add_argument("--model", default="dreamzero-mini", metavar="NAME|DIR",
                        help="bundled model (choices: dreamzero-mini, dreamzero-detour) or a folder with config.json + "
                             "model.safetensors")
    add_cache_config_argument(parser)
    parser.add_argument("--no-cache", action="store_true", help="serve without StepCache (every step computed)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (another than loopback exposes the server to the network)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port (0: any free port)")
    parser.add_argument("--session-ttl", type=positive_float, default=DEFAULT_SESSION_TTL_S, metavar="SECONDS",
                        help="a session idle for longer is closed")
    parser.add_argument("--max-sessions", type=positive_int, default=DEFAULT_MAX_SESSIONS, metavar="N",
                        help="sessions open at once")
    parser.add_argument("--max-request-bytes", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                        help="a request body above this size is refused (413) before it is parsed (a chunk request "
                             "is about 20 KB)")
    parser.add_argument("--max-message-bytes", type=positive_int, default=DEFAULT_MAX_MESSAGE_BYTES, metavar="N",
                        help="an openpi websocket message above this size closes its connection (1009) before it is "
                             "held whole (default: twice a DROID observation; the bundled model's is about 4 KB)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Api-Key KEY' (openpi's header) on every request and connection "
                             f"(default: ${API_KEY_ENV}; prefer the variable: a command line is visible to other "
                             "users of the machine)")
    parser.add_argument("--allow-no-api-key", action="store_true",
                        help="allow listening on another address than loopback without an API key (a warning is "
                             "printed: anyone who reaches the port can use the model)")
    parser.add_argument("--max-batch", type=positive_int, default=64, metavar="N",
                        help="chunks batched into one DiT forward at most")
    parser.add_argument("--decision", choices=DECISIONS, default=PER_SESSION,
                        help="per_session: each session decides its own steps; batch_mean: one decision per batch "
                             "from the mean cosine (upstream's rule, for comparison)")
    parser.add_argument("--no-batching", action="store_true", help="serve one chunk at a time (for comparison)")
    parser.add_argument("--admission-wait-ms", type=float, default=0.0, metavar="MS",
                        help="align chunks: a chunk waits up to MS for the cohort boundary (0: admit at once)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    add_threads_argument(parser)


def validate(args: argparse.Namespace) -> None:
    from stepcache.models.dreamzero.weights import load_model

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UsageError(f"stepcache serve needs the serve extra: pip install 'stepcache[serve]' ({error})") from None
    if args.no_cache and args.cache_config is not None:
        raise UsageError("argument --no-cache: not allowed with --cache-config")
    if not (args.admission_wait_ms >= 0 and args.admission_wait_ms < float("inf")):
        raise UsageError(f"argument --admission-wait-ms: must be a number of milliseconds >= 0, got "
                         f"{args.admission_wait_ms}")
    args.cache_config = None if args.no_cache else checked_cache_config(args.cache_config)
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"argument --device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"argument --device: {shown(args.device)} asked for, but torch sees no CUDA device")
    try:
        load_model(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"argument --model: {err}") from None
    from stepcache.serving.server import API_KEY_ENV, check_api_key

    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
        source = f"${API_KEY_ENV}"
    else:
        source = "argument --api-key"
    try:
        check_api_key(args.api_key)
    except ValueError as err:
        raise UsageError(f"{source}: {err}") from None
    host = args.host.strip()
    if not host:
        raise UsageError("argument --host: empty; allowed: an address such as 127.0.0.1")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and args.api_key is None and not args.allow_no_api_key:
        raise UsageError(f"argument --host: {host} is reachable from the network and no API key is set; give one "
                         f"(--api-key, or ${API_KEY_ENV}), or pass --allow-no-api-key to serve without one")
    from stepcache.serving.server import bind_socket

    try:  # bind now: a port in use is a usage error before the model loads
        args.socket = bind_socket(host, args.port)
    except socket.gaierror as err:  # the name or address itself does not resolve
        raise UsageError(f"argument --host: {host!r} is not an address of this machine: {err.strerror or err}") \
            from None
    except OSError as err:
        if err.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"argument --host: cannot listen on {host}: {err.strerror or err}") from None
        raise UsageError(f"argument --port: cannot listen on {host}:{args.port}: {err.strerror or err}") from None
    if not loopback and args.api_key is None:
        logger.warning("listening on %s without an API key (--allow-no-api-key): anyone who reaches the port can "
                       "use the model", host)
    elif not loopback:
        logger.warning("listening on %s: the API key travels in clear text (no TLS); put a TLS proxy in front "
                       "on an untrusted network", host)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; ``validate(args)`` has checked the arguments and bound the socket."""
    from stepcache.omni import Omni
    from stepcache.serving.engine import EngineConfig
    from stepcache.serving.server import bind_socket, serve, socket_url

    sock = getattr(args, "socket", None) or bind_socket(args.host, args.port)
    set_torch_threads(args.threads)
    engine = EngineConfig(decision=args.decision, max_batch=args.max_batch, batching=not args.no_batching,
                          admission_wait_s=args.admission_wait_ms / 1000)
    backend = None if args.no_cache else "step_cache"
    try:
        omni = Omni(args.model, cache_backend=backend, cache_config=args.cache_config, engine_config=engine,
                    device=args.device)
    except ValueError as err:
        sock.close()
        raise UsageError(f"argument --cache-config: {err}") from None
    cache = "off" if backend is None else format_cache_config(args.cache_config)
    model = args.model if not isinstance(args.model, Path) else str(args.model)
    print(f"stepcache serve: {model} on {socket_url(sock)} ({args.device}; cache {cache}; {args.decision} decisions; "
          f"{'one chunk at a time' if args.no_batching else f'batches of up to {args.max_batch} chunks'}; "
          f"sessions expire after {args.session_ttl:g} s idle; openpi websocket at "
          f"{socket_url(sock).replace('http://', 'ws://', 1)}/; "
          f"{'API key required' if args.api_key else 'no API key'}); Ctrl-C stops", flush=True)
    try:
        serve(omni, sock, session_ttl_s=args.session_ttl, max_sessions=args.max_sessions,
              max_request_bytes=args.max_request_bytes, max_message_bytes=args.max_message_bytes,
              api_key=args.api_key, log_level="debug" if args.verbose else "warning")
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the signal: the normal way to stop
        pass
    finally:
        omni.close()
        sock.close()
    print("stepcache serve: stopped", flush=True)
    return 0
