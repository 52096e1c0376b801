"""The model store: content-addressed blobs, one manifest per model reference, pulls, imports and tags.

    store.py      ModelStore, the one entry point: get/list, add in place, pull, tag, remove, disk usage
    names.py      model names and tags (`name[:tag]`, `:latest` by default)
    manifests.py  ModelEntry and its manifest files (read, write atomically, migrate the old registry)
    blobs.py      content-addressed blobs, link folders for multi-file models, sweeping orphans
    importer.py   importing a local file or directory: which files, hashing, hard-linking or copying
    pull.py       remote pulls: sources (URLs, hf://), resumable verified downloads shared between pulls
    targets.py    where a pull asked for over TCP may connect (public addresses, the operator's allowlist)
    errors.py     StoreError and its kinds (each with the HTTP status that fits)

Callers import from here; see store.py for the API and the layout on disk.
"""

from runnerd.store.errors import ModelExists, ModelInUse, ModelNotFound, StoreError
from runnerd.store.importer import inspect_model_file
from runnerd.store.manifests import BlobFile, ModelEntry, manifest_name
from runnerd.store.names import DEFAULT_TAG, canonical_name
from runnerd.store.pull import PullError, PullProgress, PullProgressCallback
from runnerd.store.store import ModelStore

__all__ = ["DEFAULT_TAG", "BlobFile", "ModelEntry", "ModelExists", "ModelInUse", "ModelNotFound", "ModelStore",
           "PullError", "PullProgress", "PullProgressCallback", "StoreError", "canonical_name", "inspect_model_file",
           "manifest_name"]
