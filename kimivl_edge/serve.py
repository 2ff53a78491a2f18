"""`kimivl-edge serve`: an OpenAI-compatible HTTP server (chat completions with images, models, health, tokenize).

    kimivl-edge serve -m MODEL.gguf --mmproj MMPROJ.gguf [--host 127.0.0.1] [--port 8080] [--api-key KEY] ...

Safe by default: loopback only, no CORS, images from data: URIs only; see README "Server".
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .cli_common import add_model_args, load_model
from .errors import UsageError
from .media_cli import add_media_args, media_settings


def build_parser():
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge serve", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default=os.environ.get("KIMIVL_EDGE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $KIMIVL_EDGE_API_KEY)")
    ap.add_argument("--alias", help="the model id clients see (default: the text GGUF's file name)")
    ap.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin "
                    "(repeatable; default: no CORS headers)")
    ap.add_argument("--allow-remote-images", action="store_true", help="let image_url fetch http(s) URLs")
    ap.add_argument("--media-dir", type=Path, help="let image_url name files under this directory")
    ap.add_argument("--reasoning-format", default="deepseek", choices=("deepseek", "none"),
                    help="thinking models: 'deepseek' puts the thinking in reasoning_content (default), "
                    "'none' leaves it in content (a request's reasoning_format overrides)")
    ap.add_argument("--max-body", type=int, default=32 << 20, help="request body limit in bytes (default 32 MiB)")
    ap.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    ap.add_argument("--max-image-pixels", type=int, default=1 << 25, help="pixels per image, read from its header "
                    "before decoding (default 2^25)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting behind the running one; past it "
                    "the server answers 429 (default 64)")
    ap.add_argument("--parallel", type=int, default=1, help="requests decoded together, one llama.cpp batch per "
                    "token (continuous batching; N sequences of --ctx tokens each; default 1: see README)")
    add_media_args(ap)
    return ap


def config(args):
    from .server.config import ServerConfig

    for name in ("max_body", "max_images", "max_image_pixels", "max_queue", "parallel"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise UsageError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.media_dir is not None and not args.media_dir.is_dir():
        raise UsageError(f"--media-dir {args.media_dir}: not a directory")
    return ServerConfig(model_id=args.alias or Path(args.model).name, api_key=args.api_key,
                        cors_origins=tuple(args.cors_origin), allow_remote_images=args.allow_remote_images,
                        media_dir=args.media_dir, max_body_bytes=args.max_body, max_images=args.max_images,
                        max_image_pixels=args.max_image_pixels, max_queue=args.max_queue,
                        reasoning_format=args.reasoning_format, parallel=args.parallel)


def page_url(host: str, port: int) -> str:
    """The chat page's address to open (a wildcard address is opened on this machine's loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from .server.app import create_app
    from .server.config import is_loopback

    args = build_parser().parse_args(argv)
    cfg = config(args)
    media = media_settings(args)
    if not is_loopback(args.host) and not cfg.api_key:
        print(f"kimivl-edge serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    for f in (args.model, args.mmproj):
        if f is not None and not Path(f).is_file():
            raise UsageError(f"{f}: no such file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    server: uvicorn.Server | None = None

    def stop_on_load_error() -> None:
        assert server is not None
        server.should_exit = True

    def load():
        model = load_model(args)
        model.media_settings = media
        return model

    app = create_app(cfg, load, stop_on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                           log_level="info", timeout_graceful_shutdown=5))
    print(f"kimivl-edge serve: chat page at {page_url(args.host, args.port)}", file=sys.stderr, flush=True)
    server.run()
    if app.state.scheduler.load_error is not None:
        raise UsageError(f"the model failed to load: {app.state.scheduler.load_error}")
    return 0
