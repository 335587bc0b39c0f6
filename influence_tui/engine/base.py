"""The contract between the scheduler (engine/scheduler.py) and a loaded model.

A loader (engine/loader.py) turns a path into a `LoadedModel`: a `CausalLM` that owns a static,
slot-based KV cache, a `TextTokenizer`, and facts about the model. The scheduler owns the slots:
each running request gets one slot; a finished conversation's slot keeps its KV entries so that a
follow-up request sharing the prefix only prefills the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class ModelConfig:
    architecture: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    context_length: int = 4096
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each q and k head before RoPE
    sliding_window: int | None = None  # ignored: contexts are capped at it by the loader
    rope_freq_factors: list[float] | None = field(default=None, repr=False)  # GGUF rope_freqs

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


class ModelLoadError(RuntimeError):
    """A model cannot be loaded: the message names the file and the reason (user-facing)."""


class CausalLM(Protocol):
    """What the scheduler needs from a model. A model may also offer
    `prefill_many([(slot, tokens, start_pos), ...], chunk) -> [last-position logits, ...]`: the same
    numbers as prefilling each prompt in `chunk`-aligned pieces, computed together (the fast model
    does; the transformers fallback does not, and the scheduler then calls `prefill` per piece)."""

    vocab_size: int
    context_length: int  # the model's maximum positions

    def allocate(self, max_batch: int, max_seq: int) -> None:
        """(Re)create the static KV cache with `max_batch` slots of `max_seq` positions each."""

    def prefill(self, slot: int, tokens: "list[int] | torch.Tensor", start_pos: int, all_logits: bool = False) -> Any:
        """Run `tokens` (T>=1 ids: a list or 1-D integer tensor) into `slot` at positions
        start_pos..start_pos+T-1.

        KV entries of the slot before start_pos are reused as they are. Returns float32 logits of
        the last position, shape [vocab], or of every position, shape [T, vocab], if `all_logits`:
        a torch tensor, or a numpy array from the kernel's torch-free model.
        """

    def decode(self, slots: "list[int] | torch.Tensor", tokens: "list[int] | torch.Tensor",
               positions: "list[int] | torch.Tensor") -> Any:
        """One step for B sequences at once: slots, tokens, positions are lists of B ints (or 1-D
        integer tensors).

        Each sequence attends to its own slot's positions 0..positions[i]. Returns float32 [B, vocab]
        (torch or numpy, as prefill).
        """


class TextTokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: set[int]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **options: Any) -> str:
        """Render the model's own chat template (jinja2); a ValueError when the template rejects the messages."""

    @property
    def thinks(self) -> bool:
        """A reasoning model (engine.reasoning)."""

    @property
    def has_chat_template(self) -> bool: ...


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: TextTokenizer
    name: str
    path: str
    architecture: str
    format: str  # "gguf" | "safetensors"
    quantization: str  # e.g. "Q4_1", "BF16", "F32"
    dtype: str  # compute dtype, e.g. "bfloat16"
    device: str  # "cpu", "cuda:0", "mps"
    context_length: int
    parameters: int | None = None
    load_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def release_freed_heap() -> None:
    """Give the heap that loading freed back to the OS (glibc keeps it otherwise): parsing the
    tokenizer's JSON leaves ~27 MB free but resident, which would add to the peak RSS once the
    weights are paged in."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
