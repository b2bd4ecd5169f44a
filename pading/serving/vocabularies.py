"""Durable, versioned vocabularies on shared storage (docs/serving.md, "Vocabularies").

A vocabulary is the trained classes of a bundle (version 0) followed by a chain of changes,
each a numbered version: ``create`` (a named vocabulary: a subset of the trained classes
and/or new classes), ``add`` (new classes with their fitted classifier rows), ``remove``
(classes added at run time), ``delete`` (the named vocabulary is gone; a later ``create``
of the same name continues the chain, so versions only go up) and ``snapshot`` (the whole
vocabulary as it is at that version, written every ``serve.vocabulary_snapshot_every``
versions, so a replica that starts reads the chain from its newest snapshot on, not from
version 1). The default vocabulary is called ``base``.

:class:`VocabularyStore` keeps the chains as files on a file system that every node
reads (the run's storage: a local disk for one machine, NFS/EFS/Lustre for a cluster)::

    <root>/<name>/v000000001.json              the change (the commit record)
    <root>/<name>/v000000001-<token>.safetensors   its tensors: class semantics, classifier rows
    <root>/<name>/staging/                      files being written
    <root>/<name>/snapshot.json                 {"version": N, "previous": P}: the newest snapshots (a hint)

A snapshot keeps its class records in its safetensors file's metadata, and the files of every
snapshot but the newest two are removed (``VocabularyStore._point_to_snapshot``), so the store
holds the vocabulary whole at most twice, not once per snapshot.

:class:`MlflowVocabularyStore` keeps the same chains on an MLflow tracking server
(``serve.vocabulary_store: mlflow``), with the model registry's unique names as the
compare-and-swap.

A change is committed by compare-and-swap: its tensors are written and flushed under a
unique name first, then its record is hard-linked to the next version's name, which fails if
another writer took that version first (``os.link`` is atomic on POSIX file systems and NFS).
The loser re-reads the chain and retries on top of it, so two changes made at the same time
through different replicas both end up in the store (no lost update), and a reader never sees
a record whose tensors are not all there. A failed write leaves no record behind.

``SegmentationService._apply`` (pading.serving.service) turns the state at version N into the
state at N + 1 without any fitting: the classifier rows of added classes are stored, so every
replica that replays the chain serves bit-identical classifiers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pading.classes import ClassInfo
from pading.errors import DataError, PadingError
from pading.io import fsync, fsync_directory, write_json_atomic
from pading.model.classifier import Classifier, ProjectionClassifier

logger = logging.getLogger(__name__)

BASE = "base"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RECORD = re.compile(r"^v(\d{9})\.json$")
KINDS = ("create", "add", "remove", "delete", "snapshot")
SNAPSHOT_POINTER = "snapshot.json"


class StoreUnavailableError(PadingError):
    """The vocabulary store cannot be read or written (HTTP 503: nothing was changed)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class VersionTakenError(PadingError):
    """Another writer committed the version this change was made for (retry on top of it)."""


class UnknownVocabularyError(DataError):
    """A vocabulary name the store does not hold (HTTP 404)."""


def default_store(reference: str, bundle_dir: str | Path, setting: Optional[str] = None,
                  tracking_uri: Optional[str] = None) -> str:
    """Where a bundle's vocabularies live (a directory, or ``mlflow``): ``setting``
    (``serve.vocabulary_store``) when given; for a bundle directory, ``vocabularies`` next to
    it (the run's storage); for an MLflow bundle (``runs:/<id>/...``, ``models:/<name>/<version>``),
    which has no directory of its own, the MLflow server when ``tracking_uri`` is one (http/https),
    else ``~/.pading/vocabularies/<run id or model name/version>`` (one machine's disk: set
    ``serve.vocabulary_store`` on a cluster)."""
    if setting:
        return setting if setting == MLFLOW_STORE else str(Path(setting).expanduser())
    key = store_key(reference)
    if key is None:
        return str(Path(bundle_dir).resolve().parent / "vocabularies")
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return MLFLOW_STORE
    return str(Path("~/.pading/vocabularies").expanduser() / key)


def store_key(reference: str) -> Optional[str]:
    """The MLflow bundle ``reference``'s run id or model name/version as a file-safe key (None: not MLflow)."""
    for scheme in ("runs:/", "models:/", "mlflow-artifacts:/"):
        if str(reference).startswith(scheme):
            return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(reference)[len(scheme):].strip("/")) or "bundle"
    return None


def check_name(name: str) -> str:
    """A vocabulary name: 1-64 letters, digits, ``_``, ``.`` or ``-``, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise DataError("vocabulary", f"vocabulary name {name!r} must be 1-64 letters, digits, '_', '.' or '-' "
                        "(starting with a letter or digit)")
    return name


@dataclass
class Change:
    """One version of a vocabulary chain.

    Attributes:
        kind: ``create``, ``add``, ``remove``, ``delete`` or ``snapshot``.
        classes: added classes' records (``ClassInfo`` fields), in table order.
        removed: names of removed classes (``remove``).
        only: for ``create`` and ``snapshot``, the trained classes the vocabulary keeps (None: all of them).
        semantics: (M, S) float32 semantic embeddings of the added classes (``snapshot``:
            of every class added at run time that the vocabulary has).
        weight, bias: (M, D) and (M,) their classifier rows (absent for a projection classifier).
        version: the version it was committed as (0 until then).
        created: Unix time of the commit.
        next_id: for ``snapshot``, the id the next run-time class gets (ids of removed classes
            are not given again).
    """

    kind: str
    classes: list[dict] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    only: Optional[list[str]] = None
    semantics: Optional[np.ndarray] = None
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    version: int = 0
    created: float = 0.0
    next_id: Optional[int] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("semantics", "weight", "bias"):
            value = getattr(self, key)
            if value is not None:
                out[key] = torch.as_tensor(np.ascontiguousarray(value, dtype=np.float32))
        return out


class _ChainStore:
    """What both stores share: a vocabulary's chain read through ``_versions`` and ``_read``."""

    #: whether the service writes ``snapshot`` versions to this store (serve.vocabulary_snapshot_every)
    snapshots = False

    def _versions(self, name: str) -> list[int]:
        raise NotImplementedError

    def _read(self, name: str, version: int, whole: bool = False) -> Change:
        """Version ``version`` of ``name``. A ``snapshot`` comes without its classes and tensors
        unless ``whole`` (replaying the chain past one needs neither: it equals the state before it)."""
        raise NotImplementedError

    def snapshot(self, name: str, version: int) -> Change:
        """The ``snapshot`` at ``version`` of ``name`` with its classes and tensors."""
        return self._read(name, version, whole=True)

    def _has(self, name: str, version: int) -> bool:
        """Whether version ``version`` of ``name`` is committed (one lookup, no listing)."""
        raise NotImplementedError

    def snapshot_version(self, name: str, upto: int) -> int:
        """The newest ``snapshot`` version of ``name`` not newer than ``upto`` that this store
        can find without reading the chain (0: none; replay from version 1). A hint: the
        caller reads the record and checks that it is a snapshot."""
        return 0

    def latest(self, name: str, known: int = 0) -> int:
        """The newest committed version of ``name`` (0: no change since the trained classes).

        ``known``: a version of ``name`` the caller has seen committed. Versions are committed
        one after another (version N + 1 only on top of N), so the chain is then read forward
        from it, one lookup a version, instead of listed whole: a replica checking for news
        on every request costs one lookup, not a listing that grows with every change."""
        if known <= 0:
            versions = self._versions(name)
            return versions[-1] if versions else 0
        version = known
        while self._has(name, version + 1):
            version += 1
        return version

    def changes(self, name: str, after: int = 0, upto: int | None = None) -> list[Change]:
        """The committed changes of ``name`` newer than version ``after`` (and, given ``upto``,
        a version :meth:`latest` returned, not newer than it, read without a listing), oldest first."""
        versions = range(after + 1, upto + 1) if upto is not None else [v for v in self._versions(name) if v > after]
        return [self._read(name, v) for v in versions]

    def _record_change(self, record: dict, version: int, arrays: dict) -> Change:
        return Change(kind=record["kind"], classes=record.get("classes", []), removed=record.get("removed", []),
                      only=record.get("only"), version=version, created=float(record.get("created", 0.0)),
                      semantics=arrays.get("semantics"), weight=arrays.get("weight"), bias=arrays.get("bias"),
                      next_id=record.get("next_id"))


class VocabularyStore(_ChainStore):
    """Vocabulary chains under ``root`` (module docstring). Safe for many processes on many
    nodes at once, as long as they share the file system."""

    snapshots = True

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"VocabularyStore({str(self.root)!r})"

    # ---- reading ------------------------------------------------------------------
    def _versions(self, name: str) -> list[int]:
        folder = self.root / check_name(name)
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StoreUnavailableError(f"vocabulary store {folder} cannot be read: {err}") from None
        return sorted(int(m.group(1)) for m in map(RECORD.match, entries) if m)

    def _has(self, name: str, version: int) -> bool:
        record = self.root / check_name(name) / f"v{version:09d}.json"
        try:
            record.stat()
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StoreUnavailableError(f"vocabulary store {record.parent} cannot be read: {err}") from None
        return True

    def _read(self, name: str, version: int, whole: bool = False) -> Change:
        folder = self.root / name
        try:
            record = json.loads((folder / f"v{version:09d}.json").read_text(encoding="utf-8"))
            tensors = {}
            if record.get("tensors") and (whole or record["kind"] != "snapshot"):
                path = str(folder / record["tensors"])
                tensors = load_file(path)
                if record["kind"] == "snapshot":  # its classes are kept with its tensors (pruned together)
                    with safe_open(path, framework="pt") as handle:
                        record = {**record, "classes": json.loads(handle.metadata()["classes"])}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise StoreUnavailableError(f"vocabulary store {folder}: version {version} cannot be read: {err}") from None
        return self._record_change(record, version, {k: v.numpy() for k, v in tensors.items()})

    def _pointer(self, name: str) -> dict:
        try:
            pointer = json.loads((self.root / check_name(name) / SNAPSHOT_POINTER).read_text(encoding="utf-8"))
            return {"version": int(pointer["version"]), "previous": int(pointer.get("previous") or 0)}
        except (OSError, ValueError, KeyError, TypeError):
            return {"version": 0, "previous": 0}  # none yet, or unreadable: replaying the whole chain is the same

    def snapshot_version(self, name: str, upto: int) -> int:
        version = self._pointer(name)["version"]
        return version if 0 < version <= upto and self._has(name, version) else 0

    def names(self) -> dict[str, int]:
        """``{name: latest version}`` of every vocabulary that exists now (``base`` included)."""
        out = {BASE: self.latest(BASE)}
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return out
        except OSError as err:
            raise StoreUnavailableError(f"vocabulary store {self.root} cannot be read: {err}") from None
        for entry in entries:
            if entry == BASE or not NAME_PATTERN.match(entry):
                continue
            versions = self._versions(entry)
            if versions and self._read(entry, versions[-1]).kind != "delete":
                out[entry] = versions[-1]
        return out

    def exists(self, name: str) -> bool:
        """Whether ``name`` is ``base`` or a named vocabulary whose last change is not a delete."""
        if name == BASE:
            return True
        versions = self._versions(name)
        return bool(versions) and self._read(name, versions[-1]).kind != "delete"

    # ---- writing ------------------------------------------------------------------
    def commit(self, name: str, expected: int, change: Change) -> Change:
        """Commit ``change`` as version ``expected + 1`` of ``name``.

        Raises:
            VersionTakenError: another writer committed that version first; nothing is left behind.
            StoreUnavailableError: the store cannot be written; nothing is left behind.
        """
        if change.kind not in KINDS:
            raise DataError("vocabulary change", f"unknown kind {change.kind!r}")
        folder = self.root / check_name(name)
        version = expected + 1
        token = uuid.uuid4().hex[:12]
        staging = folder / "staging"
        tensors_name = f"v{version:09d}-{token}.safetensors"
        written: list[Path] = []
        new_chain = not folder.exists()
        try:
            staging.mkdir(parents=True, exist_ok=True)
            tensors = change.tensors()
            snapshot = change.kind == "snapshot"
            if tensors:
                staged_tensors = staging / tensors_name
                written.append(staged_tensors)  # removed below if the write fails part-way
                # a snapshot's class records go with its tensors, so that pruning it keeps its record small
                save_file(tensors, str(staged_tensors),
                          metadata={"classes": json.dumps(change.classes)} if snapshot else None)
                fsync(staged_tensors)
                os.replace(staged_tensors, folder / tensors_name)
                written[-1] = folder / tensors_name
            created = time.time()
            record = {"kind": change.kind, "version": version, "created": created,
                      "classes": [] if snapshot else change.classes, "removed": change.removed, "only": change.only,
                      "tensors": tensors_name if tensors else None, "next_id": change.next_id,
                      "writer": f"{os.uname().nodename}:{os.getpid()}"}
            staged_record = staging / f"{token}.json"
            staged_record.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
            written.append(staged_record)
            fsync(staged_record)
            target = folder / f"v{version:09d}.json"
            try:
                os.link(staged_record, target)  # the commit: fails if the version exists
            except FileExistsError:
                # on NFS a retransmitted link that had succeeded reports EEXIST: then the record is ours
                if not _same_file(staged_record, target):
                    raise VersionTakenError(f"version {version} of vocabulary {name!r} was committed by another "
                                            "writer") from None
            fsync_directory(folder)
            if new_chain:  # the chain's folder itself, so a power loss cannot drop a new vocabulary
                fsync_directory(self.root)
        except VersionTakenError:
            _remove(written)
            raise
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
            _remove(written)
            raise StoreUnavailableError(f"vocabulary store {folder} cannot be written ({err}); nothing was changed") \
                from None
        _remove([staged_record])
        change.version, change.created = version, created
        if change.kind == "snapshot":
            self._point_to_snapshot(name, version)
        logger.info("vocabulary %r: committed version %d (%s)", name, version, change.kind)
        return change

    def _point_to_snapshot(self, name: str, version: int) -> None:
        """Name snapshot ``version`` in the hint for replicas that start, then prune the tensors
        (and class records) of the snapshots before the one it replaces: the newest two are
        kept whole, so a replica that read the hint just before this one still finds its
        snapshot. Replaying the chain does not need a pruned snapshot (it equals the state
        before it). Failures are logged: a replica without the hint replays from version 1."""
        folder = self.root / name
        old = self._pointer(name)
        if version <= old["version"]:
            return
        try:
            write_json_atomic(folder / SNAPSHOT_POINTER, {"version": version, "previous": old["version"]})
            if old["previous"]:
                for path in folder.glob(f"v{old['previous']:09d}-*.safetensors"):
                    path.unlink()
        except OSError as err:
            logger.warning("vocabulary %r: snapshot %d committed, but %s not updated or older snapshots not pruned: "
                           "%s", name, version, SNAPSHOT_POINTER, err)


class MlflowVocabularyStore(_ChainStore):
    """The same chains kept by an MLflow tracking server (``serve.vocabulary_store: mlflow``).

    A version is claimed by creating the registered model ``pading-vocabulary.<key>.<name>.v<N>``
    in the server's model registry; the registry refuses a name that exists, which is the
    compare-and-swap. The change's tensors are logged first, as artifacts of a run of the
    experiment ``pading-vocabularies``; the registered model's description holds the record
    and where its tensors are. ``key`` names the bundle (its run id, or model name/version).
    """

    PREFIX = "pading-vocabulary"
    EXPERIMENT = "pading-vocabularies"

    def __init__(self, tracking_uri: str, key: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.key = re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-") or "bundle"
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.root = f"mlflow:{tracking_uri}#{self.key}"
        self._run_id: Optional[str] = None

    def __repr__(self) -> str:
        return f"MlflowVocabularyStore({self.tracking_uri!r}, {self.key!r})"

    def _prefix(self, name: str) -> str:
        return f"{self.PREFIX}.{self.key}.{check_name(name)}.v"

    def _search(self, prefix: str) -> list:
        """Registered models whose name starts with ``prefix`` (LIKE's wildcards filtered out here)."""
        from mlflow.exceptions import MlflowException

        found, token = [], None
        try:
            while True:
                page = self.client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=1000,
                                                            page_token=token)
                found.extend(m for m in page if m.name.startswith(prefix))
                token = page.token
                if not token:
                    return found
        except MlflowException as err:
            raise StoreUnavailableError(f"vocabulary store {self.root} cannot be read: {err}") from None

    def _versions(self, name: str) -> list[int]:
        prefix = self._prefix(name)
        return sorted(int(m.name[len(prefix):]) for m in self._search(prefix) if m.name[len(prefix):].isdigit())

    def _has(self, name: str, version: int) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(f"{self._prefix(name)}{version:09d}")
        except MlflowException as err:
            if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise StoreUnavailableError(f"vocabulary store {self.root} cannot be read: {err}") from None
        return True

    def _read(self, name: str, version: int, whole: bool = False) -> Change:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            record = json.loads(self.client.get_registered_model(f"{self._prefix(name)}{version:09d}").description)
            arrays = {}
            if record.get("tensors"):
                local = mlflow.artifacts.download_artifacts(artifact_uri=record["tensors"],
                                                            tracking_uri=self.tracking_uri)
                arrays = {k: v.numpy() for k, v in load_file(local).items()}
        except (MlflowException, OSError, ValueError) as err:
            raise StoreUnavailableError(f"vocabulary store {self.root}: version {version} of {name!r} cannot be read: "
                                        f"{err}") from None
        return self._record_change(record, version, arrays)

    def names(self) -> dict[str, int]:
        prefix = f"{self.PREFIX}.{self.key}."
        latest: dict[str, int] = {}
        for model in self._search(prefix):
            name, _, version = model.name[len(prefix):].rpartition(".v")
            if version.isdigit() and NAME_PATTERN.match(name):
                latest[name] = max(latest.get(name, 0), int(version))
        out = {BASE: latest.pop(BASE, 0)}
        for name in sorted(latest):
            if self._read(name, latest[name]).kind != "delete":
                out[name] = latest[name]
        return out

    def exists(self, name: str) -> bool:
        if name == BASE:
            return True
        versions = self._versions(name)
        return bool(versions) and self._read(name, versions[-1]).kind != "delete"

    def _artifact_run(self) -> str:
        """This process's run for change tensors (created on first use)."""
        if self._run_id is None:
            experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
            if experiment is None:
                try:
                    location = None
                    if self.tracking_uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside it
                        location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
                    self.client.create_experiment(self.EXPERIMENT, artifact_location=location)
                except Exception:  # noqa: BLE001 - created meanwhile by another replica
                    pass
                experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
            run = self.client.create_run(experiment.experiment_id, run_name=f"{self.key}-{os.getpid()}",
                                         tags={"pading.vocabularies": self.key})
            self._run_id = run.info.run_id
        return self._run_id

    def commit(self, name: str, expected: int, change: Change) -> Change:
        import tempfile

        from mlflow.exceptions import MlflowException

        if change.kind not in KINDS:
            raise DataError("vocabulary change", f"unknown kind {change.kind!r}")
        version = expected + 1
        created = time.time()
        record = {"kind": change.kind, "version": version, "created": created, "classes": change.classes,
                  "removed": change.removed, "only": change.only, "tensors": None, "next_id": change.next_id,
                  "writer": f"{os.uname().nodename}:{os.getpid()}"}
        try:
            tensors = change.tensors()
            if tensors:
                folder = f"{check_name(name)}/v{version:09d}-{uuid.uuid4().hex[:12]}"
                with tempfile.TemporaryDirectory() as tmp:
                    save_file(tensors, str(Path(tmp) / "tensors.safetensors"))
                    run_id = self._artifact_run()
                    self.client.log_artifacts(run_id, tmp, artifact_path=folder)
                record["tensors"] = f"runs:/{run_id}/{folder}/tensors.safetensors"
            self.client.create_registered_model(f"{self._prefix(name)}{version:09d}",  # the commit
                                                tags={"kind": change.kind}, description=json.dumps(record))
        except MlflowException as err:
            if getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(err):
                raise VersionTakenError(f"version {version} of vocabulary {name!r} was committed by another writer") \
                    from None
            raise StoreUnavailableError(f"vocabulary store {self.root} cannot be written ({err}); nothing was "
                                        "changed") from None
        except OSError as err:
            raise StoreUnavailableError(f"vocabulary store {self.root} cannot be written ({err}); nothing was "
                                        "changed") from None
        change.version, change.created = version, created
        logger.info("vocabulary %r: committed version %d (%s) to %s", name, version, change.kind, self.root)
        return change


MLFLOW_STORE = "mlflow"


def open_store(spec: str | Path, tracking_uri: Optional[str] = None, key: str = "bundle"):
    """The store ``spec`` names: ``mlflow`` (the MLflow server at ``tracking_uri``, chains of
    bundle ``key``) or a directory."""
    if str(spec) == MLFLOW_STORE:
        if not tracking_uri:
            raise DataError("serve.vocabulary_store", "mlflow needs a tracking URI (tracking.tracking_uri or "
                            "MLFLOW_TRACKING_URI)")
        return MlflowVocabularyStore(tracking_uri, key)
    return VocabularyStore(spec)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


# ---- replaying a chain ------------------------------------------------------------------


def class_infos(records: list[dict]) -> list[ClassInfo]:
    return [ClassInfo(id=int(r["id"]), name=r["name"], isthing=bool(r["isthing"]), unseen=bool(r.get("unseen", True)),
                      added=bool(r.get("added", True))) for r in records]


def appended_classifier(classifier, weight: Optional[np.ndarray], bias: Optional[np.ndarray],
                        semantics: np.ndarray):
    """``classifier`` with classes appended before "no object": stored rows for a linear
    classifier, the semantics themselves for the projection baseline."""
    if isinstance(classifier, ProjectionClassifier):
        from pading.model.classifier import expand_classifier

        extra = torch.as_tensor(semantics, dtype=torch.float32, device=classifier.class_semantics.device)
        return expand_classifier(classifier, classifier.num_classes + len(semantics), new_class_semantics=extra).eval()
    if weight is None or bias is None:
        raise DataError("vocabulary change", "the change has no classifier rows for a linear classifier")
    old_weight, old_bias = classifier.linear.weight.detach(), classifier.linear.bias.detach()  # (C+1, D), (C+1,)
    rows = torch.as_tensor(weight, dtype=old_weight.dtype, device=old_weight.device)  # (M, D)
    biases = torch.as_tensor(bias, dtype=old_bias.dtype, device=old_bias.device)  # (M,)
    grown = Classifier(classifier.embed_dim, classifier.num_classes + rows.shape[0]).to(old_weight.device)
    with torch.no_grad():
        grown.linear.weight.copy_(torch.cat([old_weight[:-1], rows, old_weight[-1:]]))
        grown.linear.bias.copy_(torch.cat([old_bias[:-1], biases, old_bias[-1:]]))
    return grown.eval()
