"""codegemma: CodeGemma end to end — model, FIM completion, data recipe, trainer, evaluation, server.

import codegemma
cg = codegemma.load("path/to/model")      # a Hugging Face Gemma checkpoint directory
print(cg.complete("def fib(n):\n    ", "\n"))
"""

from codegemma.api import CodeGemma, load
from codegemma.config import ModelConfig

__all__ = ["CodeGemma", "ModelConfig", "load"]
__version__ = "0.1.0"
