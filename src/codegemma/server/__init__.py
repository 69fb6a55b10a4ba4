"""`codegemma serve`: an OpenAI- and llama.cpp-compatible completion server for editors.

    codegemma serve --model path/to/codegemma-2b            # http://127.0.0.1:8000
    curl -s localhost:8000/v1/completions -d '{"prompt": "def add(a, b):\\n    return ", "suffix": "\\n"}'

Modules: protocol.py (pydantic wire models, OpenAI error shape), serving.py (requests -> engine
jobs, FIM post-processing while streaming), scheduler.py (the thread that owns the Engine and
batches every request through it), responses.py (JSON bodies and SSE streams), prometheus.py
(Prometheus metrics), app.py (FastAPI routes and middlewares), transport.py (uvicorn's HTTP/1.1
with a deadline for request headers), settings.py (ServerSettings: limits and timeouts), cli.py
(`codegemma serve`).
Client configuration (Continue, llama.vscode, Tabby): docs/serving.md.
"""

from codegemma.server.app import app_for_model, create_app
from codegemma.server.settings import ServerSettings
from codegemma.server.transport import uvicorn_config

__all__ = ["ServerSettings", "app_for_model", "create_app", "uvicorn_config"]
