"""Which device a worker computes on, and how it describes it to the broker."""

from __future__ import annotations

import os

import torch

from pervade.errors import ConfigError
from pervade.protocol import DeviceInfo


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
