"""``crossfind serve``: a resident HTTP server with a JSON API and a web page.

The server itself (:mod:`retrieval.server.app`) needs the ``serve`` extra
(FastAPI, uvicorn); :mod:`retrieval.server.client`, which the CLI uses to hand
a search to a running server, needs only the standard library. Importing this
package imports neither.
"""

from __future__ import annotations

#: File name of the server's unix socket inside the library folder.
SOCKET_NAME = "serve.sock"
