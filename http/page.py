"""The operator's web page at `/`: one self-contained HTML file (page.html beside this module).

It loads nothing from elsewhere (an air-gapped host shows it whole) and draws itself from the
JSON routes. Its Content-Security-Policy allows exactly its own inline style and script (by
hash), requests to this server only, and no framing, so the "Refresh all" button cannot be
clicked through another site's frame.
"""

import base64
import hashlib
import re
from pathlib import Path

import falcon

TEMPLATE = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")


def inline_hash(tag: str, html: str) -> str:
    (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


POLICY = (f"default-src 'none'; style-src {inline_hash('style', TEMPLATE)}; "
          f"script-src {inline_hash('script', TEMPLATE)}; connect-src 'self'; img-src data:; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Page:
    """GET /: the page, with the token field shown when POST routes need a token."""

    def __init__(self, token_required: bool):
        self.body = TEMPLATE.replace("{{TOKEN_REQUIRED}}", "yes" if token_required else "no").encode()

    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ["no-store"]
        resp.set_header("Content-Security-Policy", POLICY)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.data = self.body
