"""Inference: static KV cache, sampling, stops, streaming and continuous batching (engine.py)."""

from codegemma.engine.engine import Engine, Event, GenerationResult
from codegemma.engine.sampling import SamplingParams

__all__ = ["Engine", "Event", "GenerationResult", "SamplingParams"]
