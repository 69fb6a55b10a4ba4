"""Training-data pipeline: source repositories -> filtered, deduplicated, redacted, FIM'd token shards.

Steps are small generator classes over `Document` records (see docs/data.md); executors (local
multiprocessing, Ray Data) run them. Entry points: `codegemma data prepare` / `codegemma data inspect`,
or `codegemma.data.pipeline.prepare(...)` from Python.
"""

from codegemma.data.document import LANGUAGES, Document, language_of

__all__ = ["LANGUAGES", "Document", "language_of"]
