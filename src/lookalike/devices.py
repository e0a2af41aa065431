"""Device names in configs: `auto` picks the best accelerator present, so one config runs on any machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lookalike.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_HINT = "expected auto, cpu, cuda, cuda:N or mps"


def check_device(name: str) -> str:
    """The name unchanged when it is `auto` or a device torch can parse (config validation); else ValueError."""
    if name in ("auto", "cpu"):  # the common names without importing torch: validating a config stays light
        return name
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(DEVICE_HINT) from None
    return name


def resolve_device(device: str | torch.device, field: str = "device") -> torch.device:
    """`auto` -> cuda when available, else mps, else cpu; any other name as torch parses it (a bad one names
    `field`)."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        return torch.device(check_device(device))
    except ValueError:
        raise ConfigError(f"{field}: {DEVICE_HINT}, got {device!r}") from None
