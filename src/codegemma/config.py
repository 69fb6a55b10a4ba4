"""Model configuration: a frozen, keyword-only dataclass, presets as data, HF `config.json` I/O.

The field names are transformers' `GemmaConfig` names, so `to_hf_dict()` / `from_hf_dict()` are
nearly the identity and a config written here loads in `AutoConfig` (model_type "gemma").
Published hyperparameters: the CodeGemma report (arXiv:2406.11409) and the Gemma report
(arXiv:2403.08295); CodeGemma uses the Gemma 1 architecture.

    >>> ModelConfig.preset("2b").num_key_value_heads   # multi-query attention
    1
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codegemma.errors import ConfigError
from codegemma.fileio import write_text_atomic

MODEL_TYPE = "gemma"
DTYPES = ("float32", "bfloat16", "float16")  # the weight/compute dtypes a model may have
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # HF Gemma: both mean the tanh approximation


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 256000
    hidden_size: int
    intermediate_size: int  # width of each GeGLU branch
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    torch_dtype: str = "bfloat16"  # the dtype the weights are stored in

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_activation {self.hidden_activation!r} is not Gemma's; use one of {ACTIVATIONS}"
            )
        if self.torch_dtype not in DTYPES:
            raise ConfigError(
                f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}"
            )
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary")

    # -- derived ---------------------------------------------------------------------------
    @property
    def attention_kind(self) -> str:
        if self.num_key_value_heads == 1:
            return "MQA"
        return "MHA" if self.num_key_value_heads == self.num_attention_heads else "GQA"

    @property
    def num_parameters(self) -> int:
        """Parameters with tied embeddings counted once (how the model card counts them)."""
        return self.num_embedding_parameters + self.num_non_embedding_parameters

    @property
    def num_embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def num_non_embedding_parameters(self) -> int:
        d, q = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        mlp = 3 * d * self.intermediate_size
        return self.num_hidden_layers * (attn + mlp + 2 * d) + d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # -- Hugging Face config.json ----------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            model_type=MODEL_TYPE,
            architectures=["GemmaForCausalLM"],
            hidden_act=self.hidden_activation,
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: codegemma runs Gemma 1 "
                f"checkpoints (model_type 'gemma', e.g. google/codegemma-2b)"
            )
        if d.get("attention_bias"):
            raise ConfigError("attention_bias=true is not Gemma's architecture (no biases)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        act = d.get("hidden_activation") or d.get("hidden_act")
        if act:
            kw["hidden_activation"] = act
        rope = d.get("rope_parameters")  # transformers >= 5 nests rope_theta here
        if isinstance(rope, dict) and "rope_theta" in rope:
            kw.setdefault("rope_theta", rope["rope_theta"])
        if "torch_dtype" not in kw and isinstance(d.get("dtype"), str):
            kw["torch_dtype"] = d["dtype"]  # transformers >= 4.56 writes "dtype"
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kw.get(name), list):  # generation configs may list several
                kw[name] = kw[name][0]
            if kw.get(name) is None:
                kw.pop(name, None)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kw and f.default is dataclasses.MISSING and f.name != "head_dim"
        ]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        if "head_dim" not in kw:  # older configs leave it implied
            hidden, heads = kw["hidden_size"], kw["num_attention_heads"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (hidden, heads)):
                raise ConfigError(
                    f"hidden_size and num_attention_heads must be integers, got {hidden!r} and "
                    f"{heads!r}"
                )
            kw["head_dim"] = hidden // heads if heads > 0 else 0  # 0: refused by __post_init__
        return cls(**kw)

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: a model directory needs a Hugging Face config.json"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(data)

    def save(self, model_dir: str | os.PathLike) -> Path:
        path = Path(model_dir) / "config.json"
        write_text_atomic(path, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return path


PRESETS: dict[str, ModelConfig] = {
    # CodeGemma 2B: multi-query attention, for fast FIM completion.
    "2b": ModelConfig(
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
    ),
    # CodeGemma 7B and 7B-IT: multi-head attention.
    "7b": ModelConfig(
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
    ),
    # What `make model` trains: the 2B's shape (MQA, GeGLU) scaled to what two CPU cores train in
    # about an hour (4 x 192: the loss of 6 x 256 per step at 2x its tokens/s in `make
    # model-sweep`); its vocabulary is the tokenizer `make model` trains. The bundled model in
    # src/codegemma/assets/ is this shape (its MODEL_CARD.md).
    "mini": ModelConfig(
        vocab_size=8192,
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        torch_dtype="float32",
    ),
    # A seconds-to-build model for tests: GQA shape, vocab large enough for Gemma's special ids.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        torch_dtype="float32",
    ),
}
