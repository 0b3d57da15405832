"""Per-device link tokens: which device identity a token stands for.

With one shared ``--auth-token`` every device looks the same, so a quota per identity could only
be a quota per address. A tokens file gives each device (or each tenant) its own token; the link
then counts requests and streams per name, over all of that name's connections.

File format: one ``NAME TOKEN`` pair per line; blank lines and ``#`` comments are ignored.
"""

from __future__ import annotations

from pathlib import Path

from dragon_core.errors import InvalidOptions

MIN_TOKEN_CHARS = 16  # a guessable token is no identity


def parse_device_tokens(text: str, where: str = "tokens file") -> dict[str, str]:
    """``{name: token}``; ``InvalidOptions`` naming the line for anything malformed."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InvalidOptions("link_tokens", f"{where}:{number}: expected 'NAME TOKEN', got {len(parts)} fields")
        name, token = parts
        if name in tokens:
            raise InvalidOptions("link_tokens", f"{where}:{number}: name {name!r} appears twice")
        if token in tokens.values():
            raise InvalidOptions("link_tokens", f"{where}:{number}: token of {name!r} is another name's too")
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidOptions("link_tokens", f"{where}:{number}: token of {name!r} is shorter than "
                                                f"{MIN_TOKEN_CHARS} characters")
        tokens[name] = token
    return tokens


def load_device_tokens(path: Path) -> dict[str, str]:
    return parse_device_tokens(path.read_text(encoding="utf-8"), str(path))
