"""Pages of list RPCs. Every listing answers at most `page_size` items (0: `DEFAULT`;
more than `MAX` is INVALID_ARGUMENT) and a `next_page_token` that asks for the rest
(empty: there is no more).

A page token is an opaque cursor: the sort key of the last item already given, tagged
with the listing it belongs to. Pages are read by key, not by offset, so an item that
stays is listed exactly once however many are added or removed between pages; one
added behind the cursor meanwhile is not (a listing is not a snapshot).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from vigil.core.errors import InvalidArgument

DEFAULT = 100
MAX = 1000

T = TypeVar("T")
Key = tuple[Any, ...]


@dataclass(frozen=True)
class Page:
    listing: str
    size: int
    after: Key | None  # the key of the last item of the previous page (None: from the start)

    @property
    def fetch(self) -> int:
        """How many rows to read: one more than the page, to know whether more follow."""
        return self.size + 1

    def arg(self, i: int) -> Any:
        """The i-th part of the cursor, for a query parameter (None on the first page)."""
        return self.after[i] if self.after is not None else None


def page(listing: str, page_size: int, page_token: str) -> Page:
    """The page a request asks for; INVALID_ARGUMENT for a bad size or token."""
    if page_size < 0 or page_size > MAX:
        raise InvalidArgument(f"page_size must be between 0 (default {DEFAULT}) and {MAX}")
    return Page(listing, page_size or DEFAULT, _decode(listing, page_token))


def split(items: Sequence[T], p: Page, key: Callable[[T], Key]) -> tuple[list[T], str]:
    """This page of `items` (read with `p.fetch`) and the token for the next one."""
    shown = list(items[: p.size])
    more = len(items) > p.size
    return shown, (encode(p.listing, key(shown[-1])) if more and shown else "")


def encode(listing: str, key: Key) -> str:
    parts = [{"t": v.isoformat()} if isinstance(v, datetime) else v for v in key]
    raw = json.dumps({"l": listing, "k": parts}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(listing: str, token: str) -> Key | None:
    if not token:
        return None
    bad = InvalidArgument(
        "page_token is not one this listing gave (pass the next_page_token of the previous "
        "page unchanged, or none for the first page)"
    )
    if len(token) > 1024:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("l") != listing:
            raise bad
        parts = data["k"]
        if not isinstance(parts, list) or not parts:
            raise bad
        return tuple(_part(v) for v in parts)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise bad from None


def _part(v: Any) -> Any:
    if isinstance(v, dict):
        return datetime.fromisoformat(v["t"])
    if isinstance(v, str | int) and not isinstance(v, bool):
        return v
    raise ValueError("not a cursor part")
