"""Tenants: who a page belongs to, and the operator's per-tenant policy (TTL, sharing).

A tenant is a request's cache salt (SGLang's ``extra_key``: the ``cache_salt``, with the LoRA id appended when one is
used); unsalted traffic ("") is the default tenant. Each tenant has a 16-hex-digit id that travels inside every
storage key of its pages (see kvdrive_sglang.radix_backend) and becomes the ``tenant`` field of their namespace, so
two tenants' pages never meet, and TTL, encryption keys and ``kvdrive clear --tenant`` apply per tenant.

The operator may let tenants share pages by giving them one ``share_as`` group: members of group G store and find
their pages under the group's identity, written ``@G``. Groups are hashed in their own domain, so a client that picks
the salt "G" gets neither the group's pages nor its key.

Operator config (``{"kvdrive": {"tenants": {...}}}``)::

    {"<salt>": {"ttl_s": 3600, "share_as": "<group>"}, "": {"ttl_s": 600}}
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from .disk_config import MAX_TTL_S
from .errors import ConfigError
from .validate import number

ID_HEX = 16  # hex digits of a tenant id
CHAIN_HEX = 64  # hex digits of a SHA-256 chain hash (SGLang's page key)
GROUP_MARK = "@"  # "@G" names the share_as group G (in key files and on the command line)
_TENANT_DOMAIN = b"kvdrive-tenant\0"
_GROUP_DOMAIN = b"kvdrive-group\0"
_SALT_PRIOR_DOMAIN = b"kvdrive-salt\0"
_GROUP_PRIOR_DOMAIN = b"kvdrive-group-prior\0"
_POLICY_KEYS = ("ttl_s", "share_as")


def _raw(name) -> bytes:
    return name if isinstance(name, bytes) else str(name).encode("utf-8")


def tenant_id(name) -> str:
    """The id of the tenant whose cache salt is ``name``: BLAKE2b-64 in the tenant domain, 16 hex digits."""
    return hashlib.blake2b(_TENANT_DOMAIN + _raw(name), digest_size=8).hexdigest()


def group_id(group: str) -> str:
    """The id of share_as group ``group`` (a different domain: no salt can produce it)."""
    return hashlib.blake2b(_GROUP_DOMAIN + _raw(group), digest_size=8).hexdigest()


def id_of_label(label: str) -> str:
    """A tenant as an operator writes it (key file, ``kvdrive clear --tenant``): a salt, ``@GROUP``, or "" for
    unsalted traffic (whose id is "")."""
    if label == "":
        return ""
    if label.startswith(GROUP_MARK):
        return group_id(label[len(GROUP_MARK) :])
    return tenant_id(label)


_HEX = frozenset("0123456789abcdef")


class Tenants:
    """The operator's tenant policy, validated; maps a request's salt to its storage identity and TTL."""

    def __init__(self, config: Mapping | None = None):
        config = {} if config is None else config
        if not isinstance(config, Mapping):
            raise ConfigError(f"kvdrive tenants must be an object of salt -> policy, got {config!r}")
        self._group: dict[str, str] = {}  # salt -> share_as group
        self._ttl: dict[str, float] = {}  # tenant id -> ttl_s
        ttl_from: dict[str, str] = {}  # tenant id -> the entry that set its ttl (for the conflict message)
        for name, policy in config.items():
            where = f"kvdrive tenants[{name!r}]"
            if not isinstance(name, str):
                raise ConfigError(f"{where}: tenant names are cache salts (strings)")
            if name.startswith(GROUP_MARK):
                raise ConfigError(
                    f"{where}: names starting with {GROUP_MARK!r} denote share_as groups; "
                    "configure the member salts instead"
                )
            if not isinstance(policy, Mapping):
                raise ConfigError(f"{where} must be an object with {' and/or '.join(_POLICY_KEYS)}, got {policy!r}")
            unknown = sorted(str(k) for k in policy if k not in _POLICY_KEYS)
            if unknown:
                raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(_POLICY_KEYS)}")
            share = policy.get("share_as")
            if share is not None:
                if name == "":
                    raise ConfigError(
                        f"{where}.share_as: unsalted traffic keeps SGLang's own keys and cannot join a group"
                    )
                if not isinstance(share, str) or not share:
                    raise ConfigError(f"{where}.share_as must be a non-empty group name, got {share!r}")
                self._group[name] = share
            tid = self.id_of(name)
            ttl = policy.get("ttl_s")
            if ttl is not None:
                number(ttl, f"{where}.ttl_s", below=MAX_TTL_S, unit="seconds")
                if tid in self._ttl and self._ttl[tid] != float(ttl):
                    raise ConfigError(
                        f"{where}.ttl_s={ttl} conflicts with {ttl_from[tid]}.ttl_s="
                        f"{self._ttl[tid]:g}: members of share_as group "
                        f"{self._group.get(name)!r} share pages, so they need one TTL"
                    )
                self._ttl[tid] = float(ttl)
                ttl_from[tid] = where

    def group_of(self, salt) -> str | None:
        return self._group.get(salt) if isinstance(salt, str) else None

    def id_of(self, salt) -> str:
        """Tenant id of a request's salt: "" when unsalted; the group's id when the operator set share_as."""
        if salt is None or salt == "" or salt == b"":
            return ""
        group = self.group_of(salt)
        return group_id(group) if group is not None else tenant_id(salt)

    def root_prior(self, salt) -> str | None:
        """Where a salted request's page-key chain starts: a 64-hex SHA-256 of the salt (or of its share_as group),
        followed by the tenant id (80 hex digits in all); None for unsalted requests (SGLang's own chain)."""
        if salt is None or salt == "" or salt == b"":
            return None
        group = self.group_of(salt)
        if group is not None:
            return hashlib.sha256(_GROUP_PRIOR_DOMAIN + _raw(group)).hexdigest() + group_id(group)
        return hashlib.sha256(_SALT_PRIOR_DOMAIN + _raw(salt)).hexdigest() + tenant_id(salt)

    def tagged_seed(self, salt, seed: str) -> str | None:
        """Where a salted request's page-key chain starts on an SGLang that salts storage keys itself: its own
        64-hex ``seed`` for the request's namespace, followed by the tenant id; for a member of a share_as group the
        group's root prior instead (its members share pages, so they share a chain start). None when unsalted."""
        if salt is None or salt == "" or salt == b"":
            return None
        if self.group_of(salt) is not None:
            return self.root_prior(salt)
        return seed + tenant_id(salt)

    def ttl_s(self, tid: str, default: float | None = None) -> float | None:
        """TTL of the pages of tenant ``tid`` (its own, else ``default``)."""
        return self._ttl.get(tid, default)


def split_key(key) -> tuple[str, str]:
    """(chain hash, tenant id) of a storage key: an 80-hex key carries its tenant id after the 64-hex chain hash;
    any other key is the default tenant's ("")."""
    if type(key) is str and len(key) == CHAIN_HEX + ID_HEX and _HEX.issuperset(key[CHAIN_HEX:]):
        return key[:CHAIN_HEX], key[CHAIN_HEX:]
    return key, ""
