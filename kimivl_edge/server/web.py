"""The chat page at ``/``: static files from the package (``server/web/``) and ``/props``, the model's defaults and
the server's limits that the page needs (llama-server's route name).

Every file is served from this package with a Content-Security-Policy that admits only this origin (plus ``data:``
and ``blob:`` images the user attached), so the page makes no request anywhere else and inline script never runs.
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from .config import ServerConfig
from .errors import LOADING, APIError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def is_page_file(path: str) -> bool:
    """The page's static files need no API key (they hold no secret; the page then asks for the key)."""
    return path == "/" or path.startswith("/web/")


def page_files() -> dict[str, bytes]:
    """The page's files by name, read once from the package."""
    root = resources.files(__package__) / "web"
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and f.name[f.name.rfind("."):] in TYPES}


def add_web_routes(app: FastAPI, cfg: ServerConfig) -> None:
    files = page_files()

    def serve(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no route /web/{name}", "not_found")
        return Response(files[name], media_type=TYPES[name[name.rfind("."):]], headers=HEADERS)

    async def index() -> Response:
        return serve("index.html")

    async def static(name: str) -> Response:
        return serve(name)

    async def props() -> dict:
        sched = app.state.scheduler
        if sched.load_error is not None:
            raise APIError(503, f"the model failed to load: {sched.load_error}", "model_load_failed")
        if not sched.ready:
            raise LOADING
        model = sched.model
        return {"model": cfg.model_id, "n_ctx": model.decoder.n_ctx, "thinking": model.info.is_thinking,
                "vision": model.vision is not None,
                "default_generation_settings": {"temperature": round(model.info.temperature, 4)},
                "limits": {"max_images": cfg.max_images, "max_image_pixels": cfg.max_image_pixels,
                           "max_body_bytes": cfg.max_body_bytes}}

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/web/{name}", static, methods=["GET"], include_in_schema=False)
    app.add_api_route("/props", props, methods=["GET"])
