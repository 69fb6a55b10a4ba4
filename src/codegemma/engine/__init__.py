"""Inference: static KV cache, sampling, stops, streaming and continuous batching (engine.py),
speculative decoding by prompt lookup (speculative.py)."""

from codegemma.engine.engine import Engine, Event, GenerationResult
from codegemma.engine.sampling import SamplingParams
from codegemma.engine.speculative import DecodeStats, PromptLookup

__all__ = ["DecodeStats", "Engine", "Event", "GenerationResult", "PromptLookup", "SamplingParams"]
