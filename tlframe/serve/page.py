"""The page bin/serve answers at `GET /`: pick or drop a photo, see its top classes.

One HTML file (page.html, beside this module) with its style and script
inline and no external scripts, fonts or images: it works offline. It talks to
the server's REST API like any client (`/v1/models/NAME/metadata` for the
model's name, version and labels; `:predict` with the photo's bytes as b64), so
there is one API. Its Content-Security-Policy allows exactly that inline style
and script (by their sha256) and requests to the server itself: the browser
loads and runs nothing else.
"""

import base64
import hashlib
import html
import importlib.resources
import re

PAGE_FILENAME = "page.html"
_MODEL_NAME = "{{model_name}}"


def _source_hash(template, tag):
  """The CSP source of the one inline `<tag>` element's text: 'sha256-<base64>'."""
  (text,) = re.findall(rf"<{tag}>(.*?)</{tag}>", template, re.DOTALL)
  digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
  return f"'sha256-{digest}'"


class Page:
  """The page for `model_name`: `body` (UTF-8 HTML) and the `headers` to send with it."""

  def __init__(self, model_name):
    template = importlib.resources.files("tlframe.serve").joinpath(PAGE_FILENAME).read_text("utf-8")
    self.body = template.replace(_MODEL_NAME, html.escape(model_name)).encode("utf-8")
    policy = (f"default-src 'none'; script-src {_source_hash(template, 'script')}; "
              f"style-src {_source_hash(template, 'style')}; img-src blob: data:; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    self.headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
