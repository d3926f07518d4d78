"""The Hub client: an `HfApi` built from HF_TOKEN / HF_ENDPOINT, and retries that end in one `HubError` line.

The token is only ever handed to huggingface_hub; nothing here writes or logs it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

from loraforge.errors import HubError

T = TypeVar("T")

# Tests lower these; users rarely need to.
RETRY_ATTEMPTS = int(os.environ.get("LORAFORGE_HUB_RETRIES", "4"))
RETRY_BASE_WAIT = float(os.environ.get("LORAFORGE_HUB_RETRY_WAIT", "1.0"))
DEFAULT_ENDPOINT = "https://huggingface.co"
# Transport libraries huggingface_hub has used across its majors; their errors mean a dropped
# or refused connection, which is worth retrying like a 5xx.
_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11")


def endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token(explicit: str | None = None) -> str | None:
    """An explicit token, else HF_TOKEN, else the one `hf auth login` stored; None when anonymous."""
    if explicit:
        return explicit
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no login stored, or an unreadable token file: go anonymous
        return None


def hub_api(token_value: str | None = None):
    """An `HfApi` bound to the current endpoint and token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token(token_value), library_name="loraforge")


def status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """5xx / 408 / 429 answers and dropped or refused connections; not 4xx mistakes."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = status_of(exc)
        return status is None or status >= 500 or status in (408, 429)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES


def describe(exc: BaseException, secret: str | None = None) -> str:
    """One line about `exc` without the token in it."""
    status = status_of(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    # huggingface_hub appends request ids and doc links; the first sentence is the useful part.
    text = text[:200]
    if secret:
        text = text.replace(secret, "***")
    return f"HTTP {status}: {text}" if status and not text.startswith(str(status)) else text


def with_retries(what: str, fn: Callable[[], T], attempts: int | None = None, secret: str | None = None) -> T:
    """Run `fn`, retrying transient failures with exponential back-off; a HubError when they run out."""
    attempts = attempts or RETRY_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise HubError(f"{what} failed: {describe(exc, secret)}") from None
            if attempt == attempts:
                raise HubError(
                    f"{what} failed after {attempts} attempts ({describe(exc, secret)}); "
                    f"check the network or {endpoint()} and run the command again"
                ) from None
            time.sleep(RETRY_BASE_WAIT * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover
