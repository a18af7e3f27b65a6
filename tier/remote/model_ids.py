"""The model part of a remote namespace: a model identity that holds across machines (kvdrive issue 19).

A local store names its model by path plus the weight files' sizes and modification times (kvdrive_sglang
model_identity): right for one machine, but two machines with their own copy of the same weights never agree on it,
so they would never share a remote page. The remote tier therefore addresses its objects under a namespace whose
model field is a *cross-machine* identity, everything else (dtype, layout, page size, heads, layers, TP rank, tenant,
extra fields) as the local namespace has it:

    1. what the server registered here for its local identity (``share_model``; kvdrive_sglang/model_identity.py
       decides which, and why): ``model_id`` from --kvdrive-remote-config (the operator asserts that every node using
       it serves identical weights), an HF hub snapshot commit, or a full-content hash of the weights
    2. else ``model_id`` as the engine was given it (``"model_id:<id>"``: engines built without SGLang)
    3. else the local identity itself: shared only with servers holding this exact path, sizes and mtimes

The three kinds carry distinct prefixes (local identities are absolute paths or hub names, which hold no ``:``), so
an identity of one kind never equals one of another. A process-wide registry, because the SGLang side learns the
model's path and revision (ServerArgs) where it builds namespaces, not where it builds the engine; the mapping is a
pure function of the files, so one table serves every engine of the process. No SGLang import here.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from ..namespace import Namespace

MODEL_ID_PREFIX = "model_id:"

_lock = threading.Lock()
_shared: dict[str, str] = {}


def share_model(local: str, shared: str) -> None:
    """Record that local model identity ``local`` is, across machines, ``shared``."""
    with _lock:
        _shared[local] = shared


def forget_models() -> None:
    """Drop every recorded mapping (tests)."""
    with _lock:
        _shared.clear()


def shared_model(local: str, model_id: str | None = None) -> str:
    """The model field of a remote namespace for a page of local model ``local``."""
    with _lock:
        shared = _shared.get(local)
    if shared is not None:
        return shared
    return MODEL_ID_PREFIX + model_id if model_id else local


def remote_namespace(ns: Namespace, model_id: str | None = None) -> Namespace:
    """``ns`` with its model field replaced by the cross-machine identity (``ns`` itself where that is the same)."""
    model = shared_model(ns.model, model_id)
    return ns if model == ns.model else replace(ns, model=model)
