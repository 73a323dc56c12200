"""Which device a worker computes on, how it describes it to the broker, and what suits it.

A cluster lent opportunistically mixes GPU generations (A10s beside TITAN Xs beside H100s), so nothing about
the device is tuned by hand. The worker reads its device's properties and derives two things:

- **dtype** (``fit_dtype``): a context asked for in ``auto`` loads in bfloat16 where the GPU computes it
  natively (compute capability 8.0 and up: A100, A10, L4, H100, H200), in float16 on older GPUs (Pascal,
  Volta, Turing: TITAN X, V100, T4), and in float32 on a CPU. An explicit dtype is kept, except bfloat16 on a
  GPU older than 8.0, which is refused: the context then fails on that worker and the broker offers it to
  the others.
- **micro-batch size** (``BatchPlan``): a batch from the producer is split into micro-batches of at most
  ``max_tokens`` padded tokens, sized from the memory left free after the weights are loaded and the
  activations of one forward pass per token. A batch that still runs out of memory is split in half and
  retried, and the plan shrinks for good (``BatchPlan.shrink``).

docs/heterogeneous.md gives the policy with its numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pervade.errors import ConfigError, ContextLoadError
from pervade.protocol import DeviceInfo

#: Compute capability from which a GPU has native bfloat16 arithmetic (Ampere).
BF16_MIN_CAPABILITY = (8, 0)
#: Padded tokens per micro-batch on a CPU: larger passes are no faster there, and pad more (measured with
#: the small model on FEVER claims, one thread: 289 claims/s at 512-1,024 tokens, 241 at 8,192).
CPU_BATCH_TOKENS = 1024
#: Bounds of a GPU micro-batch, in padded tokens: at least one long prompt; at most what keeps the
#: per-batch latency low enough for the prefetch window to hide it.
MIN_BATCH_TOKENS = 512
MAX_BATCH_TOKENS = 131_072
#: Share of the free device memory (after loading the weights) that activations may take.
ACTIVATION_MEMORY_SHARE = 0.6


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first visible GPU (the batch system sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {requested!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for, but no CUDA GPU is visible")
    return device


def describe_device(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(
            kind="cuda",
            name=props.name,
            memory_bytes=int(props.total_memory),
            compute_capability=f"{props.major}.{props.minor}",
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return DeviceInfo(kind="cpu", name=f"cpu-{os.cpu_count()}core", memory_bytes=int(memory))


def compute_capability(info: DeviceInfo) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, None for a CPU or an unreadable value."""
    if info.kind != "cuda" or not info.compute_capability:
        return None
    major, _, minor = info.compute_capability.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def fit_dtype(requested: str, info: DeviceInfo) -> str:
    """The dtype a context asked for as ``requested`` is loaded in on this device (see the module doc)."""
    capability = compute_capability(info)
    native_bf16 = capability is not None and capability >= BF16_MIN_CAPABILITY
    if requested == "auto":
        if info.kind == "cpu" or capability is None:
            return "float32"
        return "bfloat16" if native_bf16 else "float16"
    if requested == "bfloat16" and capability is not None and not native_bf16:
        raise ContextLoadError(
            f"bfloat16 asked for, but {info.name} (compute capability {info.compute_capability}) has no native "
            "bfloat16; use --dtype auto or float16"
        )
    return requested


@dataclass
class BatchPlan:
    """How many padded tokens one forward pass may hold on this device for one loaded model.

    ``max_tokens`` halves after running out of memory and grows back a quarter at a time after
    ``GROW_AFTER`` passes without, never beyond the ``ceiling`` it was planned with: one transient
    out-of-memory (a co-tenant process, fragmentation) does not cost the rest of a long job."""

    max_tokens: int
    ceiling: int = 0
    _passes_since_shrink: int = 0

    #: Passes without running out of memory after which a shrunk budget grows back by a quarter.
    GROW_AFTER = 64

    def __post_init__(self) -> None:
        self.ceiling = self.ceiling or self.max_tokens

    def micro_batches(self, lengths: list[int], overhead: int = 0) -> list[list[int]]:
        """Indices of the claims, grouped into micro-batches: sorted by length (so each micro-batch pads
        little), each within ``max_tokens`` padded tokens, one claim at least. ``overhead`` is what each row
        costs beyond its own tokens, in tokens' worth of memory (a reused prefix's keys and values)."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        groups: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = lengths[index] + overhead  # sorted: the newcomer is the longest in the group
            if current and longest * (len(current) + 1) > self.max_tokens:
                groups.append(current)
                current = []
            current.append(index)
        if current:
            groups.append(current)
        return groups

    def shrink(self, tokens_tried: int) -> bool:
        """After running out of memory on ``tokens_tried`` tokens: halve the budget. False when it cannot
        shrink any more (one claim did not fit)."""
        if tokens_tried <= 1:
            return False
        self.max_tokens = max(1, min(self.max_tokens, tokens_tried) // 2)
        self._passes_since_shrink = 0
        return True

    def passed(self) -> None:
        """A forward pass fit: after enough of them, let a shrunk budget grow back towards the ceiling."""
        if self.max_tokens >= self.ceiling:
            return
        self._passes_since_shrink += 1
        if self._passes_since_shrink >= self.GROW_AFTER:
            self.max_tokens = min(self.ceiling, self.max_tokens + max(1, self.max_tokens // 4))
            self._passes_since_shrink = 0


#: Attention span assumed when sizing micro-batches: eager (non-fused) attention keeps a heads x span
#: matrix of fp32 scores per token; FEVER prompts are ~170 tokens, so 512 leaves room for long templates.
ATTENTION_SPAN_TOKENS = 512


def activation_bytes_per_token(config: object, dtype_bytes: int) -> int:
    """Peak activation memory per token of one forward pass without a KV cache: a layer's hidden states,
    attention projections and MLP intermediates (layers run one after another, so one layer's worth), plus
    the attention scores of an unfused kernel (fp32, over ``ATTENTION_SPAN_TOKENS``)."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    return max(1, (6 * hidden + 3 * intermediate) * dtype_bytes + heads * ATTENTION_SPAN_TOKENS * 4)


def kv_bytes_per_token(config: object, dtype_bytes: int) -> int:
    """Keys and values one token leaves in the KV cache, over all layers."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    layers = int(getattr(config, "num_hidden_layers", 0) or 1)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def prefix_overhead_tokens(config: object, dtype_bytes: int, prefix_tokens: int) -> int:
    """What a reused prefix of ``prefix_tokens`` adds to each row of a micro-batch, in tokens' worth of
    activation memory: the pass holds the prefix's keys and values once per row (``BatchPlan.micro_batches``)."""
    if prefix_tokens <= 0:
        return 0
    ratio = kv_bytes_per_token(config, dtype_bytes) / activation_bytes_per_token(config, dtype_bytes)
    return max(1, round(prefix_tokens * ratio))


def plan_batches(info: DeviceInfo, config: object, dtype: torch.dtype, free_bytes: int | None) -> BatchPlan:
    """A micro-batch budget for a model with this ``config`` in ``dtype``; ``free_bytes`` is the device memory
    free after loading it (None on a CPU)."""
    if info.kind == "cpu" or free_bytes is None:
        return BatchPlan(max_tokens=CPU_BATCH_TOKENS)
    per_token = activation_bytes_per_token(config, torch.empty((), dtype=dtype).element_size())
    tokens = int(free_bytes * ACTIVATION_MEMORY_SHARE) // per_token
    return BatchPlan(max_tokens=max(MIN_BATCH_TOKENS, min(MAX_BATCH_TOKENS, tokens)))
