"""The one place timm models are created: an unknown name or weights that cannot be downloaded become one-line
errors."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import timm
from torch import nn

from lookalike.core.errors import LookalikeError

PROBE_TIMEOUT_S = (
    3.0  # one TCP connection to the hub before a pretrained download: fail at once instead of minutes of retries
)


def create_timm_model(
    name: str, field: str, pretrained: bool = False, local: str = "weights=PATH for a local file", **kwargs
) -> nn.Module:
    """timm.create_model(name, pretrained, **kwargs); errors name `field` (e.g. model): `.name` when timm does not
    know the
    model, `.pretrained` when its weights cannot be downloaded, with what to set instead (`local`: the offline
    alternative)."""
    unreachable = None
    try:
        with _offline_when_unreachable(pretrained) as unreachable:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for an unknown model name
        raise LookalikeError(f"{field}.name: {exc}") from None
    except DOWNLOAD_ERRORS as exc:
        reason = unreachable or _root_cause(exc)
        raise LookalikeError(
            f"{field}.pretrained: could not download weights for {name} ({reason}); use {field}.pretrained=false to "
            "train from scratch, "
            f"or {field}.{local}"
        ) from None


def _download_errors() -> tuple[type[BaseException], ...]:
    """What the hub (and torch.hub URL downloads) raise when weights cannot be fetched: OSError covers the hub's
    LocalEntryNotFoundError and urllib's URLError; the hub's HTTP errors (401, 404, 5xx after retries) are their own."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, HfHubHTTPError)


DOWNLOAD_ERRORS = _download_errors()


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of an exception chain as 'Type: first line' (the hub wraps the real network error twice)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    line = (str(exc).splitlines() or [""])[0][:200]
    return f"{exc.__class__.__name__}: {line}" if line else exc.__class__.__name__


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached (host not found, connection refused, timeout), or None when it can,
    when
    a proxy is configured (only the proxy knows) or when HF_HUB_OFFLINE already makes the hub fail at once."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or urllib.request.getproxies():
        return None
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{constants.ENDPOINT} unreachable: {exc.__class__.__name__}: {exc}"
    return None


@contextlib.contextmanager
def _offline_when_unreachable(pretrained: bool) -> Iterator[str | None]:
    """Run the block in the hub's offline mode (weights from the local cache only, no retries) when a pretrained
    model is
    wanted and the hub cannot be reached; yields the reason, or None when the block runs unchanged."""
    reason = hub_unreachable() if pretrained else None
    if reason is None:
        yield None
        return
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = saved
