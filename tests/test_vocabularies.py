"""pading.serving.vocabularies and the store side of SegmentationService: durable, versioned
vocabularies shared by several services (the replicas), compare-and-swap commits, named
vocabularies, and a store that cannot be written (no Ray, no HTTP)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_bundle import EXTRA_NAMES, build_tiny_bundle

from pading.bundle import Bundle
from pading.errors import UnknownClassError
from pading.serving.service import ClassConflictError, RequestError, SegmentationService, http_status
from pading.serving.vocabularies import (
    BASE,
    Change,
    StoreUnavailableError,
    UnknownVocabularyError,
    VersionTakenError,
    VocabularyStore,
)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bundle") / "linear"
    build_tiny_bundle(directory)
    return directory


@pytest.fixture(params=["files", "mlflow"])
def store(request, tmp_path):
    """A directory store, and the same chains on an MLflow tracking store (SQLite here; a server in production)."""
    if request.param == "mlflow":
        from pading.serving.vocabularies import MlflowVocabularyStore

        return MlflowVocabularyStore(f"sqlite:///{tmp_path / 'mlflow.db'}", "runs:/0123abcd/bundle")
    return VocabularyStore(tmp_path / "vocabularies")


def _files(store) -> list[str]:
    return sorted(p.name for p in (store.root / BASE).iterdir()) if isinstance(store, VocabularyStore) else []


def replica(bundle_dir, store, vocabulary=BASE) -> SegmentationService:
    """A service over its own copy of the bundle, as a replica on another node would have."""
    return SegmentationService(Bundle.load(bundle_dir), store=store, vocabulary=vocabulary)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)


def _names(service) -> list[str]:
    return [c["name"] for c in service.classes()["classes"]]


# ---- the store ----------------------------------------------------------------------------


def test_commits_are_numbered_and_a_stale_one_leaves_nothing_behind(store):
    assert store.latest(BASE) == 0 and store.changes(BASE) == []
    first = store.commit(BASE, 0, Change("add", classes=[{"id": 99, "name": "kite", "isthing": True}],
                                         semantics=np.ones((1, 4), np.float32), weight=np.ones((1, 3), np.float32),
                                         bias=np.zeros(1, np.float32)))
    assert first.version == 1 and store.latest(BASE) == 1
    files = _files(store)
    with pytest.raises(VersionTakenError):  # made for version 1, which exists
        store.commit(BASE, 0, Change("add", classes=[{"id": 100, "name": "lamp", "isthing": True}],
                                     semantics=np.ones((1, 4), np.float32)))
    assert _files(store) == files  # no record, no tensors left (directory store)
    (read,) = store.changes(BASE)
    assert read.kind == "add" and read.classes[0]["name"] == "kite" and np.array_equal(read.weight, np.ones((1, 3)))


def test_a_known_version_is_followed_forward_without_listing_the_chain(store, monkeypatch):
    for version in range(3):
        store.commit("team", version, Change("create" if version == 0 else "delete" if version == 1 else "create"))
    assert store.latest("team") == 3 and store.latest("team", known=1) == 3 and store.latest("team", known=3) == 3
    assert [c.kind for c in store.changes("team", after=1, upto=3)] == ["delete", "create"]
    assert store.changes("team", after=3, upto=3) == []

    def no_listing(*args, **kwargs):
        raise AssertionError("the chain was listed")

    monkeypatch.setattr(store, "_versions", no_listing)
    assert store.latest("team", known=2) == 3  # one lookup a version from the known one
    store.commit("team", 3, Change("delete"))
    assert store.latest("team", known=3) == 4
    assert [c.version for c in store.changes("team", after=2, upto=4)] == [3, 4]


def test_a_deleted_vocabulary_keeps_its_versions_going_up(store):
    store.commit("team-a", 0, Change("create", only=["person"]))
    assert store.names() == {BASE: 0, "team-a": 1} and store.exists("team-a")
    store.commit("team-a", 1, Change("delete"))
    assert not store.exists("team-a") and "team-a" not in store.names()
    assert store.commit("team-a", 2, Change("create")).version == 3


def test_a_link_that_landed_before_its_error_is_the_commit(tmp_path, monkeypatch):
    """On NFS a retransmitted link that had succeeded reports EEXIST: the record is then ours,
    the commit stands and its tensors stay; a version another writer took is still refused."""
    import os

    import pading.serving.vocabularies as vocabularies

    store = VocabularyStore(tmp_path / "vocabularies")
    real_link = os.link

    def link_then_eexist(source, target):
        real_link(source, target)
        raise FileExistsError(17, "File exists", str(target))

    monkeypatch.setattr(vocabularies.os, "link", link_then_eexist)
    change = Change("add", classes=[{"id": 99, "name": "kite", "isthing": True}],
                    semantics=np.ones((1, 4), np.float32), weight=np.ones((1, 3), np.float32),
                    bias=np.zeros(1, np.float32))
    assert store.commit(BASE, 0, change).version == 1
    (read,) = store.changes(BASE)  # its tensors were kept
    assert read.classes[0]["name"] == "kite" and np.array_equal(read.weight, np.ones((1, 3)))
    monkeypatch.setattr(vocabularies.os, "link", real_link)
    with pytest.raises(VersionTakenError):
        store.commit(BASE, 0, Change("remove", removed=["kite"]))


def test_a_new_vocabulary_folder_is_made_durable_in_the_store(tmp_path, monkeypatch):
    import pading.serving.vocabularies as vocabularies

    synced = []
    monkeypatch.setattr(vocabularies, "fsync_directory", lambda path: synced.append(path))
    store = VocabularyStore(tmp_path / "vocabularies")
    store.commit("team", 0, Change("create"))
    assert synced == [store.root / "team", store.root]  # the commit's link, then the new folder's entry
    synced.clear()
    store.commit("team", 1, Change("delete"))
    assert synced == [store.root / "team"]


def test_bad_vocabulary_names_are_refused(store):
    for name in ("", "../etc", "a b", "x" * 65, ".hidden"):
        with pytest.raises(RequestError.__mro__[1], match="vocabulary name"):
            store.latest(name)


# ---- replicas sharing a store ---------------------------------------------------------------


def test_a_class_added_through_one_replica_is_served_by_another_with_identical_rows(bundle_dir, store, image):
    first, second = replica(bundle_dir, store), replica(bundle_dir, store)
    result = first.add_classes([EXTRA_NAMES[0]])
    assert result["vocabulary_version"] == 1
    assert EXTRA_NAMES[0] in _names(second)  # caught up before answering: read-your-writes
    assert second.segment([image])[0]["vocabulary_version"] == 1
    late = replica(bundle_dir, store)  # a replica started afterwards starts from the latest version
    for other in (second, late):
        assert torch.equal(other.bundle.classifier.linear.weight, first.bundle.classifier.linear.weight)


def test_concurrent_adds_through_two_replicas_both_land(bundle_dir, store):
    first, second = replica(bundle_dir, store), replica(bundle_dir, store)
    barrier = threading.Barrier(2)
    errors = []

    def add(service, name):
        barrier.wait()
        try:
            service.add_classes([name])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=add, args=(s, n)) for s, n in ((first, EXTRA_NAMES[1]), (second, EXTRA_NAMES[2]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.latest(BASE) == 2
    for service in (first, second, replica(bundle_dir, store)):
        assert {EXTRA_NAMES[1], EXTRA_NAMES[2]} <= set(_names(service))


def test_a_change_that_lost_the_race_is_redone_on_top(bundle_dir, store, monkeypatch):
    first, second = replica(bundle_dir, store), replica(bundle_dir, store)
    commit = store.commit
    raced = []

    def commit_after_the_other(name, expected, change):  # the other replica commits first, once
        if not raced:
            raced.append(True)
            second.add_classes([EXTRA_NAMES[3]])
        return commit(name, expected, change)

    monkeypatch.setattr(store, "commit", commit_after_the_other)
    result = first.add_classes([EXTRA_NAMES[0]])
    assert result["vocabulary_version"] == 2 and store.latest(BASE) == 2
    assert {EXTRA_NAMES[0], EXTRA_NAMES[3]} <= set(_names(first))
    monkeypatch.undo()
    with pytest.raises(ClassConflictError):  # a name the other replica added meanwhile is a conflict
        first.add_classes([EXTRA_NAMES[3]])


def test_a_chain_is_replayed_in_runs_of_additions_with_the_same_rows(bundle_dir, store, monkeypatch):
    """A replica that starts replays the chain with one concatenation per run of additions (a
    chain of classes added one at a time would otherwise copy the classifier once a class:
    quadratic at 20,000 classes), and ends with the rows, vectors and table of the replica that
    made the changes one by one."""
    import pading.serving.service as service_module

    def encode(names):
        return np.stack([np.random.default_rng(sum(map(ord, n))).normal(size=16) for n in names]).astype(np.float32)

    writer = SegmentationService(Bundle.load(bundle_dir), store=store, encode_fn=encode)
    names = [f"thing {k}" for k in range(7)]
    for name in names[:4]:
        writer.add_classes([name])
    writer.delete_class(names[1])
    for name in names[4:]:
        writer.add_classes([name])
    appended, real = [], service_module.appended_classifier
    monkeypatch.setattr(service_module, "appended_classifier",
                        lambda classifier, weight, *args: appended.append(len(weight)) or real(classifier, weight, *args))
    reader = replica(bundle_dir, store)
    assert appended == [4, 3]  # the additions before the removal, then those after it
    assert reader.state.version == writer.state.version == 8
    assert reader.bundle.table.to_records() == writer.bundle.table.to_records()
    assert torch.equal(reader.bundle.classifier.linear.weight, writer.bundle.classifier.linear.weight)
    assert torch.equal(reader.bundle.classifier.linear.bias, writer.bundle.classifier.linear.bias)
    assert np.array_equal(reader.bundle.class_semantics, writer.bundle.class_semantics)


def test_removing_through_one_replica_reaches_the_others(bundle_dir, store):
    first, second = replica(bundle_dir, store), replica(bundle_dir, store)
    first.add_classes([EXTRA_NAMES[0]])
    assert EXTRA_NAMES[0] in _names(second)
    second.delete_class(EXTRA_NAMES[0])
    assert EXTRA_NAMES[0] not in _names(first) and first.state.version == 2


def test_a_store_that_cannot_be_written_changes_nothing(bundle_dir, store, image):
    if not isinstance(store, VocabularyStore):
        pytest.skip("the failure is injected in the directory store's staging area")
    service = replica(bundle_dir, store)
    service.add_classes([EXTRA_NAMES[0]])
    staging = store.root / BASE / "staging"
    staging.rmdir()
    staging.write_text("not a directory")  # the store's staging area cannot take files
    before = sorted(p.name for p in (store.root / BASE).iterdir())
    with pytest.raises(StoreUnavailableError) as caught:
        service.add_classes([EXTRA_NAMES[1]])
    assert http_status(caught.value) == 503
    assert sorted(p.name for p in (store.root / BASE).iterdir()) == before  # nothing half written
    assert service.state.version == 1 and EXTRA_NAMES[1] not in _names(service)
    assert service.segment([image])[0]["vocabulary_version"] == 1  # still serving the last version
    staging.unlink()
    assert service.add_classes([EXTRA_NAMES[1]])["vocabulary_version"] == 2


def test_a_store_that_cannot_be_read_leaves_the_replica_healthy(bundle_dir, store, image, monkeypatch):
    """An outage of the store (NFS, the MLflow server) must not fail health checks: the
    platform would replace every replica, and a new one cannot start without the store."""
    service = replica(bundle_dir, store)
    service.add_classes([EXTRA_NAMES[0]])

    def unavailable(*args, **kwargs):
        raise StoreUnavailableError("the store is down (injected)")

    monkeypatch.setattr(store, "latest", unavailable)
    monkeypatch.setattr(service, "_checked_at", float("-inf"))  # the next sync reads the store
    service.health_check()
    assert EXTRA_NAMES[0] in {c["name"] for c in service.bundle.table.to_records()}
    with pytest.raises(StoreUnavailableError):  # a request that reads the store still says why it cannot
        service.segment([image])


# ---- named vocabularies -------------------------------------------------------------------


def test_named_vocabularies_hold_exactly_their_own_classes(bundle_dir, store, image):
    base = replica(bundle_dir, store)
    kept = ["person", "car", "grass-merged"]
    created = base.create_vocabulary("street", add=[EXTRA_NAMES[0]], only=kept)
    assert created["vocabulary_version"] == 1 and created["num_classes"] == 4
    street = replica(bundle_dir, store, "street")
    assert _names(street) == kept + [EXTRA_NAMES[0]]
    for task in ("panoptic", "instance", "semantic"):
        (answer,) = street.segment([image], task=task)
        assert answer["vocabulary"] == "street"
        assert {e["class_name"] for e in answer[task]} <= set(kept + [EXTRA_NAMES[0]])
    assert EXTRA_NAMES[0] not in _names(base)  # the base vocabulary is untouched
    street.add_classes([EXTRA_NAMES[1]])
    assert _names(replica(bundle_dir, store, "street"))[-1] == EXTRA_NAMES[1]
    assert [v["name"] for v in base.vocabularies()["vocabularies"]] == [BASE, "street"]


def test_named_vocabulary_errors(bundle_dir, store):
    base = replica(bundle_dir, store)
    with pytest.raises(UnknownVocabularyError) as caught:
        replica(bundle_dir, store, "nowhere")
    assert http_status(caught.value) == 404
    base.create_vocabulary("team", add=[EXTRA_NAMES[0]])
    with pytest.raises(ClassConflictError):  # 409: exists
        base.create_vocabulary("team")
    with pytest.raises(RequestError, match="at least one class"):
        base.create_vocabulary("empty", only=[])
    with pytest.raises(RequestError, match="at most"):  # too many new classes in one request
        base.create_vocabulary("huge", add=[f"class {i}" for i in range(base.config.max_new_classes + 1)])
    with pytest.raises(UnknownClassError):
        base.create_vocabulary("typo", only=["persn"])
    with pytest.raises(RequestError, match="at most 200"):  # a class name is stored and repeated in answers
        base.create_vocabulary("long", add=["x" * 201])
    with pytest.raises(ClassConflictError, match="leaves out"):  # trained, not in 'only': listed, not added
        base.create_vocabulary("farm", add=["car"], only=["person"])
    base.create_vocabulary("farm", only=["person"])
    with pytest.raises(ClassConflictError, match="leaves out"):
        replica(bundle_dir, store, "farm").add_classes(["car"])
    with pytest.raises(ClassConflictError, match="already in the vocabulary"):
        replica(bundle_dir, store, "farm").add_classes(["person"])
    with pytest.raises(ClassConflictError):
        base.delete_vocabulary(BASE)
    team = replica(bundle_dir, store, "team")
    base.delete_vocabulary("team")
    with pytest.raises(UnknownVocabularyError):
        team.classes()  # the loaded replica notices the delete
    with pytest.raises(UnknownVocabularyError):
        base.delete_vocabulary("team")


def _vectors(names):
    return np.stack([np.random.default_rng(sum(map(ord, n))).normal(size=16) for n in names]).astype(np.float32)


def _snapshot_every(bundle_dir, every: int):
    import dataclasses

    return dataclasses.replace(Bundle.load(bundle_dir).config.serve, vocabulary_snapshot_every=every)


def _same_state(reader: SegmentationService, writer: SegmentationService) -> None:
    assert reader.state.version == writer.state.version
    assert reader.state.next_id == writer.state.next_id and reader.state.visible == writer.state.visible
    assert reader.bundle.table.to_records() == writer.bundle.table.to_records()
    assert torch.equal(reader.bundle.classifier.linear.weight, writer.bundle.classifier.linear.weight)
    assert torch.equal(reader.bundle.classifier.linear.bias, writer.bundle.classifier.linear.bias)
    assert np.array_equal(reader.bundle.class_semantics, writer.bundle.class_semantics)


def test_a_replica_starts_from_the_newest_snapshot_with_the_same_state(bundle_dir, tmp_path, monkeypatch):
    """Every serve.vocabulary_snapshot_every versions the writer commits the whole vocabulary; a
    replica that starts reads the newest snapshot and the versions after it, not the chain from
    version 1, and ends with the same classes, rows, vectors and next id (a removed class's id
    is not given again). Without the snapshot hint it replays the whole chain to the same state."""
    store = VocabularyStore(tmp_path / "vocabularies")
    writer = SegmentationService(Bundle.load(bundle_dir), _snapshot_every(bundle_dir, 3), store=store,
                                 encode_fn=_vectors)
    writer.add_classes(["thing 0"])
    writer.add_classes(["thing 1"])
    assert writer.delete_class("thing 1")["vocabulary_version"] == 3  # the answer names the change's version
    assert writer.state.version == 4  # then the snapshot
    early = SegmentationService(Bundle.load(bundle_dir), store=store, encode_fn=_vectors)
    _same_state(early, writer)  # "thing 1" had the newest id: the snapshot keeps it from being given again
    writer.add_classes(["thing 2"])
    writer.add_classes(["thing 3"])  # version 6, then the snapshot at 7
    writer.add_classes(["thing 4", "thing 5"])  # version 8
    kinds = [change.kind for change in store.changes(BASE)]
    assert kinds == ["add", "add", "remove", "snapshot", "add", "add", "snapshot", "add"]
    assert store.snapshot_version(BASE, upto=8) == 7 and store.snapshot_version(BASE, upto=6) == 0  # the hint names the newest only

    read, real_read = [], store._read
    monkeypatch.setattr(store, "_read",
                        lambda name, version, whole=False: read.append(version) or real_read(name, version, whole))
    reader = SegmentationService(Bundle.load(bundle_dir), store=store, encode_fn=_vectors)
    assert read == [7, 8]
    _same_state(reader, writer)
    assert reader.add_classes(["thing 6"])["added"][0]["id"] == writer.state.next_id

    # a third snapshot prunes the first one's files (the newest two are kept whole)
    for name in ("thing 7", "thing 8", "thing 9"):  # versions 10-12 (thing 6 was 9), then the snapshot at 13
        writer.add_classes([name])
    assert store.snapshot_version(BASE, upto=13) == 13
    folder = store.root / BASE
    assert [bool(list(folder.glob(f"v{v:09d}-*.safetensors"))) for v in (4, 7, 13)] == [False, True, True]
    assert json.loads((folder / "v000000013.json").read_text())["classes"] == []  # the classes are in its file

    (folder / "snapshot.json").unlink()  # no hint: the whole chain, past the pruned snapshot, to the same state
    read.clear()
    again = SegmentationService(Bundle.load(bundle_dir), store=store, encode_fn=_vectors)
    assert read == list(range(1, 14))
    _same_state(again, writer)


def test_a_named_vocabularys_snapshot_keeps_its_subset(bundle_dir, tmp_path):
    store = VocabularyStore(tmp_path / "vocabularies")
    trained = Bundle.load(bundle_dir).table.names
    writer = SegmentationService(Bundle.load(bundle_dir), _snapshot_every(bundle_dir, 2), store=store,
                                 encode_fn=_vectors)
    writer.create_vocabulary("team", only=trained[:2], add=["kite"])
    team = SegmentationService(Bundle.load(bundle_dir), _snapshot_every(bundle_dir, 2), store=store,
                               vocabulary="team", encode_fn=_vectors)
    team.add_classes(["thing 0"])  # version 2, then the snapshot at 3
    assert [c.kind for c in store.changes("team")] == ["create", "add", "snapshot"]
    reader = SegmentationService(Bundle.load(bundle_dir), store=store, vocabulary="team", encode_fn=_vectors)
    _same_state(reader, team)
    assert _names(reader) == trained[:2] + ["kite", "thing 0"]


def test_a_snapshot_that_cannot_be_written_leaves_the_change_acknowledged(bundle_dir, tmp_path, monkeypatch, caplog):
    # the snapshot is best effort: a full disk while writing it (safetensors' own error) fails neither the change
    # that triggered it nor a replica that starts later, and leaves no file behind
    import logging

    import safetensors

    import pading.serving.vocabularies as vocabularies

    real_save = vocabularies.save_file

    def no_space_for_snapshots(tensors, path, metadata=None):
        if metadata is not None:  # only a snapshot's file carries metadata
            Path(path).write_bytes(b"part")
            raise safetensors.SafetensorError("No space left on device (os error 28)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(vocabularies, "save_file", no_space_for_snapshots)
    store = VocabularyStore(tmp_path / "vocabularies")
    writer = SegmentationService(Bundle.load(bundle_dir), _snapshot_every(bundle_dir, 2), store=store,
                                 encode_fn=_vectors)
    writer.add_classes(["thing 0"])
    with caplog.at_level(logging.WARNING, logger="pading.serving.service"):
        answer = writer.add_classes(["thing 1"])  # version 2: the snapshot fails
    assert answer["vocabulary_version"] == 2 and "no snapshot after version 2" in caplog.text
    assert [c.kind for c in store.changes(BASE)] == ["add", "add"] and writer.state.version == 2
    assert not list((store.root / BASE / "staging").iterdir())
    _same_state(SegmentationService(Bundle.load(bundle_dir), store=store, encode_fn=_vectors), writer)
