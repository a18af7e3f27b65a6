"""Exceptions the tier engine raises. Every one names the input that caused it, so callers can show it as is."""


class KvdriveError(Exception):
    """Base class: anything kvdrive raises on purpose."""


class ConfigError(KvdriveError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class CodecError(KvdriveError, ValueError):
    """A page cannot be encoded or decoded as asked (wrong dtype, length, codec or a damaged blob)."""


class StoreError(KvdriveError):
    """The on-disk store cannot be used."""


class StoreDirError(StoreError):
    """The store directory is missing, not a directory, or not writable."""


class StoreFormatError(StoreError):
    """The directory holds something other than a store of this format version."""


class StoreLockedError(StoreError):
    """Another process holds the store in a mode that excludes ours."""
