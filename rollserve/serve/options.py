"""The options of `rollserve serve` (and `python -m rollserve.serve.server`).

Apart from the server so that they import neither torch nor zmq: `rollserve serve --help` is quick.
"""

import argparse
import os

from ..config import add_engine_arguments, parse_size

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_arguments(ap) -> None:
    """The `serve` options, on `ap` (a standalone parser or a `rollserve serve` subparser)."""
    ap.add_argument("--model", required=True, help="HF folder or .gguf file")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    ap.add_argument("--host", default="127.0.0.1", help="address every front binds (127.0.0.1: loopback only)")
    ap.add_argument("--zmq-port", type=int, default=0, help="ZMQ port for RemoteLLM (0: a free one)")
    ap.add_argument("--http-port", type=int, default=0, help="HTTP port (0: a free one, -1: no HTTP front)")
    ap.add_argument("--weights-port", type=int, default=0, help="shared-memory weight receiver port (0: free)")
    ap.add_argument("--api-key", default=os.environ.get("ROLLSERVE_API_KEY"),
                    help="required on control and weight messages, and on generation (default $ROLLSERVE_API_KEY)")
    ap.add_argument("--shm-prefix", default=None, help="names this engine's shared-memory segments")
    ap.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                    help="model name(s) the HTTP front answers to; responses carry the first "
                         "(default: the model folder's or file's name)")
    ap.add_argument("--max-request-bytes", type=_size, default="16MiB",
                    help="largest message header or HTTP body (bytes, or a size such as 16MiB)")
    ap.add_argument("--max-update-bytes", type=_size, default="4GiB",
                    help="largest update_weights message over ZMQ tensor frames (bytes, or a size such as 4GiB; "
                         "the shared-memory and weight-group transports are not limited)")
    ap.add_argument("--no-access-log", dest="access_log", action="store_false",
                    help="no log line per HTTP request (method, path, status, tokens, latency)")
    ap.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                    help="least severe log messages shown; debug also prints the traceback of a start-up failure")
    add_engine_arguments(ap.add_argument_group("engine (see rollserve.EngineConfig)"))


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
