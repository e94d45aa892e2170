"""API keys: who may use the gateway, and which models.

Keys come from a file (`--api-keys-file`, YAML or JSON) and/or the
PRISM_API_KEYS environment variable (comma-separated keys, every model).
The file is a list of entries:

    - name: team-a                 # names the key in logs and metrics; unique
      key_sha256: 9f86d0...        # sha256 hex of the key (`printf %s KEY | sha256sum`), or
      # key: sk-plain-text         # the key itself
      models: [tiny-llama]         # optional allow-list; absent: every model
      limits: {rate_limit_rps: 5}  # optional overrides of the gateway's limits (services/gateway/limits.py)

Only sha256 digests are kept in memory. No keys at all: authentication is
off and every client is `anonymous` (the default local run).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.gateway.limits import LimitOverrides, parse_limit_overrides

ENV_VAR = "PRISM_API_KEYS"
ANONYMOUS = "anonymous"  # the one client of a gateway without keys

_KEY_TEXT = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a header value carries it unchanged
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_ENTRY_FIELDS = {"name", "key", "key_sha256", "models", "limits"}


class KeyFileError(ValueError):
    pass


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)  # sha256 of the key; the key itself is not kept
    models: frozenset[str] | None = None  # None: every model
    limits: LimitOverrides = field(default_factory=LimitOverrides)  # overrides of the gateway's limits


class KeyStore:
    def __init__(self, keys: Sequence[ApiKey] = ()):
        names = [key.name for key in keys]
        if len(set(names)) != len(names):
            raise KeyFileError(f"API key names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
        if len({key.digest for key in keys}) != len(keys):
            raise KeyFileError("the same API key is configured twice (under two names)")
        self.keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The entry of the presented key, or None. Its digest is compared with
        every entry's, in constant time and without stopping at a match: how long
        this takes says nothing about the stored digests (a digest learnt through
        timing would let an attacker guess a weak key offline, at hash speed)."""
        digest = digest_of(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value (REST header or gRPC metadata)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# ---- loading -------------------------------------------------------------------


def _entry(raw: Any, where: str) -> ApiKey:
    if not isinstance(raw, dict):
        raise KeyFileError(f"{where}: an entry must be a mapping with name and key or key_sha256")
    unknown = set(raw) - _ENTRY_FIELDS
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(_ENTRY_FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise KeyFileError(f"{where}: name is required (a non-empty string)")
    where = f"{where} ({name})"
    if ("key" in raw) == ("key_sha256" in raw):
        raise KeyFileError(f"{where}: give exactly one of key and key_sha256")
    if "key" in raw:
        key = raw["key"]
        if not isinstance(key, str) or not _KEY_TEXT.fullmatch(key):
            raise KeyFileError(f"{where}: key must be a non-empty string of visible ASCII characters")
        digest = digest_of(key)
    else:
        hex_digest = raw["key_sha256"]
        if not isinstance(hex_digest, str) or not _SHA256_HEX.fullmatch(hex_digest):
            raise KeyFileError(f"{where}: key_sha256 must be 64 hex digits (printf %s KEY | sha256sum)")
        digest = bytes.fromhex(hex_digest)
    models = raw.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise KeyFileError(f"{where}: models must be a list of model names")
        models = frozenset(models)
    try:
        limits = parse_limit_overrides(raw.get("limits", {}), where)
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None
    return ApiKey(name=name, digest=digest, models=models, limits=limits)


def keys_from_entries(entries: Any, source: str) -> list[ApiKey]:
    """The keys of a parsed keys file; raises KeyFileError naming the bad entry."""
    if not isinstance(entries, list):
        raise KeyFileError(f"{source}: expected a list of key entries, got {type(entries).__name__}")
    return [_entry(raw, f"{source} entry {i}") for i, raw in enumerate(entries)]


def keys_from_env(value: str | None) -> list[ApiKey]:
    """PRISM_API_KEYS: comma-separated keys, each allowed every model, named env-1, env-2, ..."""
    keys = [k.strip() for k in (value or "").split(",") if k.strip()]
    for i, key in enumerate(keys, 1):
        if not _KEY_TEXT.fullmatch(key):
            raise KeyFileError(f"{ENV_VAR}: key {i} must be visible ASCII characters without spaces")
    return [ApiKey(name=f"env-{i}", digest=digest_of(key)) for i, key in enumerate(keys, 1)]


def read_keys_file(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from None
    try:
        entries = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise KeyFileError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    return keys_from_entries(entries, str(path))


def load_key_store(path: Path | None, env_value: str | None) -> KeyStore:
    """Raises KeyFileError with a message for the operator."""
    keys = read_keys_file(path) if path is not None else []
    return KeyStore([*keys, *keys_from_env(env_value)])
