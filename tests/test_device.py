"""The device policy of a mixed cluster: which dtype and how many tokens per forward pass each GPU gets."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from pervade.errors import ContextLoadError
from pervade.gpuworker.device import (
    MAX_BATCH_TOKENS,
    MIN_BATCH_TOKENS,
    BatchPlan,
    activation_bytes_per_token,
    fit_dtype,
    plan_batches,
)
from pervade.protocol import DeviceInfo

GIB = 1024**3
H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GIB, compute_capability="9.0")
A10 = DeviceInfo(kind="cuda", name="NVIDIA A10", memory_bytes=24 * GIB, compute_capability="8.6")
V100 = DeviceInfo(kind="cuda", name="Tesla V100-SXM2-16GB", memory_bytes=16 * GIB, compute_capability="7.0")
TITAN_X = DeviceInfo(kind="cuda", name="NVIDIA TITAN X (Pascal)", memory_bytes=12 * GIB, compute_capability="6.1")
CPU = DeviceInfo(kind="cpu", name="cpu-2core", memory_bytes=24 * GIB)
SMOLLM2_1_7B = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32)


@pytest.mark.parametrize(
    ("device", "dtype"), [(H100, "bfloat16"), (A10, "bfloat16"), (V100, "float16"), (TITAN_X, "float16"), (CPU, "float32")]
)
def test_auto_picks_the_fastest_safe_dtype_of_each_device(device: DeviceInfo, dtype: str) -> None:
    assert fit_dtype("auto", device) == dtype


def test_an_explicit_dtype_is_kept() -> None:
    assert fit_dtype("float32", H100) == "float32"
    assert fit_dtype("float16", A10) == "float16"
    assert fit_dtype("bfloat16", CPU) == "bfloat16"  # emulated on a CPU, but it works


def test_bfloat16_on_a_gpu_without_it_fails_the_context_with_the_reason() -> None:
    with pytest.raises(ContextLoadError, match=r"TITAN X .*6\.1.* no native bfloat16"):
        fit_dtype("bfloat16", TITAN_X)


def test_a_bigger_free_memory_allows_bigger_micro_batches_within_bounds() -> None:
    small = plan_batches(TITAN_X, SMOLLM2_1_7B, torch.float16, free_bytes=8 * GIB)
    large = plan_batches(H100, SMOLLM2_1_7B, torch.bfloat16, free_bytes=76 * GIB)
    assert MIN_BATCH_TOKENS <= small.max_tokens < large.max_tokens <= MAX_BATCH_TOKENS
    per_token = activation_bytes_per_token(SMOLLM2_1_7B, 2)
    assert small.max_tokens * per_token <= 8 * GIB  # activations fit in what is free
    assert plan_batches(A10, SMOLLM2_1_7B, torch.bfloat16, free_bytes=0).max_tokens == MIN_BATCH_TOKENS


def test_micro_batches_are_sorted_by_length_and_within_the_budget() -> None:
    lengths = [30, 10, 50, 10, 20, 40, 45]
    groups = BatchPlan(max_tokens=100).micro_batches(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert max(lengths[i] for i in group) * len(group) <= 100
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)


def test_a_claim_longer_than_the_budget_still_gets_a_micro_batch_of_its_own() -> None:
    assert BatchPlan(max_tokens=16).micro_batches([5, 40, 6]) == [[0, 2], [1]]


def test_a_plan_shrinks_below_what_failed_and_stops_at_one_token() -> None:
    plan = BatchPlan(max_tokens=4096)
    assert plan.shrink(1000) and plan.max_tokens == 500
    assert plan.shrink(4000) and plan.max_tokens == 250
    assert not BatchPlan(max_tokens=1).shrink(1)


def test_a_shrunk_plan_grows_back_to_its_ceiling_after_passes_that_fit() -> None:
    plan = BatchPlan(max_tokens=4096)
    plan.shrink(4096)
    assert plan.max_tokens == 2048
    for _ in range(BatchPlan.GROW_AFTER - 1):
        plan.passed()
    assert plan.max_tokens == 2048  # not yet
    plan.passed()
    assert plan.max_tokens == 2560  # a quarter more
    for _ in range(BatchPlan.GROW_AFTER * 10):
        plan.passed()
    assert plan.max_tokens == plan.ceiling == 4096  # never beyond what it was planned with
