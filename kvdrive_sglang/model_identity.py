"""The model part of a namespace: locally, and across machines for the shared remote tier (kvdrive issue 19).

Local stores (``model_identity``): the model's name or path plus, for a local directory, a fingerprint of its config
and weight files' names, sizes and modification times. Cheap, and right on one machine: weights replaced in place
give a new namespace. It never matches across machines (another path, other mtimes), which is safe but means two
nodes with their own copy of a model would never share a remote page.

The remote tier (``cross_machine_identity``) needs an identity that holds across machines and is still never wrong
-- two different weights must never get the same one, since a page from another model is a wrong page, served. In
order of preference:

    MODEL_ID     ``--kvdrive-remote-config '{"model_id": "..."}'``: the operator asserts every node using that id
                 serves identical weights
    HF_SNAPSHOT  the model is a Hugging Face hub snapshot: ``.../models--org--name/snapshots/<commit>/`` (or a link to
                 one), or a hub name resolved through the hub cache (a ``--revision`` that is a commit, else the
                 cache's ref for the branch, "main" by default). A commit names the repository's content exactly;
                 the top-level files' names and sizes are folded in as well (a partly downloaded snapshot, or one
                 fetched with other file patterns, differs). The hub cache is taken as the hub tools keep it:
                 files are never edited in place there.
    CONTENT      a local directory: SHA-256 of config.json and every top-level weight and JSON file's name, size and
                 full content. Sampling (a safetensors header plus some 1 MiB chunks) was rejected: a fine-tune that
                 changes one tensor outside the samples would collide, and a collision serves wrong KV. A full hash
                 reads the whole model, so it is done only up to ``model_hash_max_bytes`` (default 2 GiB: ~2 s at
                 the ~1.2 GB/s SHA-256 measured on these machines' cores; 0 turns it off); a directory without a
                 weight file at its top level gets no content identity (its weights are elsewhere, unhashed).
    LOCAL        none of these: the local identity, with ONE log line saying the shared tier is then shared only with
                 servers that have this exact path and file mtimes, and how to set model_id.

Every cross-machine identity also folds in the server flags that change the KV computed from the same files
(``--dtype``, ``--quantization``, ``--modelopt-quant``, ``--json-model-override-args``, ``--load-format``): the local
identity never had them, and across a fleet differently configured servers are likelier than on one machine.

A hub name resolved through a branch ref is the one residual window: the ref is read when the namespace is built,
seconds after the weights were loaded; another process on the same machine downloading a newer commit of that branch
into the same cache in between would make this server claim the newer commit. Pass ``--revision <commit>`` (or
model_id) to close it.
"""

from __future__ import annotations

import enum
import glob
import hashlib
import json
import logging
import os
import re
import threading
from typing import NamedTuple

log = logging.getLogger("kvdrive.sglang")

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.json")
_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".gguf")
_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# ServerArgs fields that change the KV computed from the same weight files
_LOAD_FIELDS = ("dtype", "quantization", "modelopt_quant", "json_model_override_args", "load_format")
DEFAULT_HASH_MAX_BYTES = 2 << 30
_CHUNK = 8 << 20


class IdentitySource(str, enum.Enum):
    """Where a remote namespace's model identity came from."""

    MODEL_ID = "model_id"
    HF_SNAPSHOT = "hf_snapshot"
    CONTENT = "content"
    LOCAL = "local"


class SharedIdentity(NamedTuple):
    model: str  # the remote namespace's model field
    source: IdentitySource
    why: str  # for the log line: what it is, or why there is no cross-machine identity


# --- local ----------------------------------------------------------------------------------------------------------
def model_identity(model: str | None) -> str:
    """The model part of a local namespace: its name or path, plus (for a local directory) a fingerprint of its config
    and weight files (names, sizes, modification times). Weights replaced in place give a new namespace, never old
    pages; the same weights copied elsewhere miss the store (safe) rather than risk a wrong match."""
    if not model:
        return "unknown-model"
    if not os.path.isdir(model):
        return model
    h = hashlib.blake2b(digest_size=12)
    for pattern in _WEIGHT_GLOBS:
        for f in sorted(glob.glob(os.path.join(model, pattern))):
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cfg = os.path.join(model, "config.json")
    if os.path.exists(cfg):
        with open(cfg, "rb") as fh:
            h.update(fh.read())
    return f"{os.path.abspath(model)}@{h.hexdigest()}"


# --- across machines ------------------------------------------------------------------------------------------------
def _model_files(model_dir: str) -> list[str]:
    """Top-level weight and JSON files, sorted by name (what model_identity fingerprints, once each)."""
    files = set()
    for pattern in _WEIGHT_GLOBS:
        files.update(f for f in glob.glob(os.path.join(model_dir, pattern)) if os.path.isfile(f))
    return sorted(files, key=os.path.basename)


def _has_weights(files: list[str]) -> bool:
    return any(f.endswith(_WEIGHT_EXTS) for f in files)


def _names_and_sizes(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}\n".encode())
    return h.hexdigest()[:16]


def snapshot_identity(model_dir: str) -> str | None:
    """``hf:<repo>@<commit>#<names and sizes>`` for a hub cache snapshot directory with weights, else None."""
    m = _SNAPSHOT.search(os.path.abspath(model_dir)) or _SNAPSHOT.search(os.path.realpath(model_dir))
    if m is None:  # (realpath: a link to a snapshot, as some deployments name their model directory)
        return None
    files = _model_files(model_dir)
    if not _has_weights(files):
        return None
    return f"hf:{m['repo']}@{m['commit']}#{_names_and_sizes(files)}"


def hub_snapshot_dir(name: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The hub cache's snapshot directory for hub model ``name`` at ``revision`` (a commit, or a branch / tag read
    through the cache's refs; None: "main"), or None where the cache has none."""
    if not name or name.count("/") != 1 or name.startswith(("/", ".")):
        return None
    if cache_dir is None:
        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:
            return None
        cache_dir = HF_HUB_CACHE
    repo = os.path.join(cache_dir, "models--" + name.replace("/", "--"))
    commit = revision if revision and _COMMIT.match(revision) else None
    if commit is None:
        try:
            with open(os.path.join(repo, "refs", revision or "main")) as fh:
                commit = fh.read().strip()
        except OSError:
            return None
    snap = os.path.join(repo, "snapshots", commit)
    return snap if _COMMIT.match(commit) and os.path.isdir(snap) else None


def content_identity(model_dir: str, max_bytes: int) -> tuple[str | None, str]:
    """(``sha256:<digest>`` of the directory's top-level weight and JSON files: names, sizes, full content; why)
    -- (None, why) where it has no weight file, or they total more than ``max_bytes``."""
    files = _model_files(model_dir)
    if not _has_weights(files):
        return None, f"no weight file at the top of {model_dir}"
    total = sum(os.path.getsize(f) for f in files)
    if total > max_bytes:
        return None, (
            f"its files total {total / 2**30:.1f} GiB, over model_hash_max_bytes ({max_bytes / 2**30:.1f} GiB) "
            "for a full-content hash at startup"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}\n".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}", f"SHA-256 of {len(files)} files, {total / 2**20:.1f} MiB"


def cross_machine_identity(
    path: str | None,
    revision: str | None = None,
    *,
    local: str,
    download_dir: str | None = None,
    hash_max_bytes: int = DEFAULT_HASH_MAX_BYTES,
    load_fields: dict | None = None,
) -> SharedIdentity:
    """The remote namespace's model identity for model ``path`` (a directory or a hub name) at ``revision``; ``local``
    is its local identity (the fallback). ``load_fields``: the server flags that change the KV (folded in)."""
    model, source, why = None, IdentitySource.LOCAL, "the server's model path is not known"
    if path and os.path.isdir(path):
        model = snapshot_identity(path)
        if model is not None:
            source, why = IdentitySource.HF_SNAPSHOT, "hub snapshot commit"
        elif hash_max_bytes > 0:
            model, why = content_identity(path, hash_max_bytes)
            source = IdentitySource.CONTENT if model is not None else source
        else:
            why = "model_hash_max_bytes is 0 (no content hash)"
    elif path:
        snap = hub_snapshot_dir(path, revision, download_dir)
        model = snapshot_identity(snap) if snap is not None else None
        if model is not None:
            source, why = IdentitySource.HF_SNAPSHOT, f"hub cache snapshot {snap}"
        else:
            why = f"{path!r} is neither a directory nor a hub model in the hub cache"
    if model is None:
        return SharedIdentity(local, IdentitySource.LOCAL, why)
    return SharedIdentity(with_load_fields(model, load_fields), source, why)


def with_load_fields(model: str, load_fields: dict | None) -> str:
    """``model`` with the server flags that change the KV computed from its files (those set) appended."""
    fields = {k: v for k, v in sorted((load_fields or {}).items()) if v is not None}
    if fields:
        model += "|" + json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return model


# --- the server's ----------------------------------------------------------------------------------------------------
_done: dict[tuple, SharedIdentity] = {}
_done_lock = threading.Lock()


def server_model_identity(config, args) -> str:
    """The model part of this server's local namespace. SGLang names the model to the storage backend by
    ``served_model_name``, which the operator may set to anything (two checkpoints or revisions served under one name
    would share pages), so the model path and revision of the server this process runs win where SGLang published
    them for it (``args``: those ServerArgs, or None; ``served_model_name`` defaults to the path, so such a server's
    namespace is what it always was).

    With the remote tier on, also records its cross-machine identity for the remote tier (tier/remote/model_ids.py)."""
    path = getattr(args, "model_path", None)
    served = getattr(args, "served_model_name", None)
    if not path or served != config.model_name:
        local = model_identity(config.model_name)  # not this storage config's server (or none published)
        # for the remote tier: a backend built without published args is named by its model_name alone, trusted as
        # the local identity trusts it; SGLang 0.5.23 leaves ServerArgs.served_model_name None and resolves it later
        # to the model path (arg_groups/serving_hook.py), so None with model_name == model_path is this server's
        # model; a served name that differs from the model path names nothing to fingerprint
        if args is None:
            share_across_machines(config, args, config.model_name, None, local)
        elif path and (served or path) == config.model_name:
            share_across_machines(config, args, path, getattr(args, "revision", None), local)
        else:
            share_across_machines(config, args, None, None, local)
        return local
    revision = getattr(args, "revision", None)
    local = model_identity(path) + (f"@revision={revision}" if revision else "")
    share_across_machines(config, args, path, revision, local)
    return local


def share_across_machines(config, args, path: str | None, revision: str | None, local: str) -> SharedIdentity | None:
    """With --kvdrive-remote: derive the cross-machine identity of local identity ``local`` once per process, record
    it for the remote tier, and log one line saying which it is (or, falling back to ``local``, what that means and
    how to set model_id). None without a remote tier."""
    from .config import KvdriveSettings
    from .tier.errors import ConfigError
    from .tier.remote.model_ids import MODEL_ID_PREFIX, share_model

    try:
        spec = KvdriveSettings.from_extra_config(config.extra_config).remote_spec()
    except (ConfigError, AttributeError):
        return None  # the storage backend reports a bad config itself, before any namespace is built
    if spec is None:
        return None
    opts = spec.options
    load_fields = {k: getattr(args, k, None) for k in _LOAD_FIELDS}
    key = (local, path, revision, opts.model_id, opts.model_hash_max_bytes, repr(sorted(load_fields.items())))
    with _done_lock:
        if key in _done:
            return _done[key]
        if opts.model_id:
            model = with_load_fields(MODEL_ID_PREFIX + opts.model_id, load_fields)
            found = SharedIdentity(model, IdentitySource.MODEL_ID, "model_id from --kvdrive-remote-config")
        else:
            found = cross_machine_identity(
                path,
                revision,
                local=local,
                download_dir=getattr(args, "download_dir", None),
                hash_max_bytes=opts.model_hash_max_bytes,
                load_fields=load_fields,
            )
        share_model(local, found.model)
        _done[key] = found
    if found.source is IdentitySource.LOCAL:
        log.warning(
            "kvdrive: remote tier: no cross-machine identity for model %s (%s); the shared tier is shared only with "
            "servers that have this exact path and file mtimes. To share it across machines, set "
            '--kvdrive-remote-config \'{"model_id": "<name>@<revision>"}\' (you assert identical weights)',
            local,
            found.why,
        )
    else:
        log.info("kvdrive: remote tier: model identity %s (%s: %s)", found.model, found.source.value, found.why)
    return found
