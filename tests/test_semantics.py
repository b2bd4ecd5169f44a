import numpy as np
import pytest

from pading.classes import ClassTable
from pading.config import SemanticsConfig
from pading.errors import MissingWeightsError, UnknownClassError
from pading.model.semantics import class_embeddings, encode_texts, load_vector_file


def test_minilm_embeddings_are_normalised_and_semantic():
    vectors = encode_texts(["cow", "sheep", "road", "pavement-merged"])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sim = vectors @ vectors.T
    assert sim[0, 1] > sim[0, 2]  # cow is nearer sheep than road
    assert sim[2, 3] > sim[2, 0]  # road is nearer pavement than cow


def test_names_are_cleaned():
    a, b = encode_texts(["tree-merged", "tree"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_cache_roundtrip(tmp_path):
    table = ClassTable.from_categories(
        [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "grass-merged", "isthing": 0}]
    )
    cfg = SemanticsConfig()
    first = class_embeddings(table, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("semantics-*.npy"))) == 1
    np.testing.assert_array_equal(class_embeddings(table, cfg, cache_dir=tmp_path), first)


def test_file_encoder(tmp_path):
    path = tmp_path / "w2v.txt"
    path.write_text("person 1 0 0\ntraffic light 0 3 0\ngrass 0 0 2\n")
    vectors = encode_texts(["person", "traffic light", "grass-merged"], "file", file=str(path))
    np.testing.assert_allclose(vectors, np.eye(3), atol=1e-6)
    assert set(load_vector_file(path)) == {"person", "traffic light", "grass"}
    with pytest.raises(UnknownClassError, match="unicorn"):
        encode_texts(["unicorn"], "file", file=str(path))
    np.save(tmp_path / "v.npy", np.eye(2, dtype=np.float32))
    (tmp_path / "v.names.txt").write_text("cat\ndog\n")
    np.testing.assert_allclose(encode_texts(["dog"], "file", file=str(tmp_path / "v.npy")), [[0, 1]])


def test_clip_without_weights_fails_clearly(tmp_path):
    with pytest.raises(MissingWeightsError, match="clip_weights"):
        encode_texts(["cow"], "clip")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        encode_texts(["cow"], "clip", clip_weights=str(tmp_path / "missing.bin"))


def test_empty_name_rejected():
    with pytest.raises(ValueError, match="empty"):
        encode_texts(["  "])


def test_the_packaged_embeddings_are_the_models_for_each_builtin_vocabulary(tmp_path):
    """Each built-in vocabulary's shipped vectors are what the MiniLM model gives for that list
    in one call (on another CPU the model's last bits may differ, hence the tolerance), and
    `pading embeddings --write-packaged` writes exactly the shipped set."""
    from pading.cli import main
    from pading.model.semantics import PACKAGED_DIR, builtin_vocabularies, packaged_embeddings

    config = SemanticsConfig()
    assert main(["embeddings", "--write-packaged", "--out", str(tmp_path)]) == 0  # the model, one call a list
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in PACKAGED_DIR.glob("semantics-*.npy"))
    arrays = [np.load(p) for p in tmp_path.iterdir()]
    for name, texts in builtin_vocabularies().items():
        shipped = packaged_embeddings(texts, config)
        assert shipped is not None and shipped.shape == (len(texts), 384) and shipped.dtype == np.float32, name
        (written,) = [array for array in arrays if array.shape[0] == len(texts)]
        np.testing.assert_allclose(shipped, written, atol=1e-5, err_msg=name)


def test_a_builtin_vocabulary_is_read_without_the_model_and_any_other_list_is_encoded(tmp_path, monkeypatch):
    import pading.model.semantics as semantics
    from pading.data.synthetic import synthetic_table

    calls = []
    monkeypatch.setattr(semantics, "encode_with_config",
                        lambda texts, config, device="cpu": calls.append(list(texts)) or np.zeros((len(texts), 384), np.float32))
    table = synthetic_table()
    vectors = class_embeddings(table, SemanticsConfig(), cache_dir=tmp_path)
    assert calls == [] and vectors.shape == (20, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert class_embeddings(table.texts[:5], SemanticsConfig(), cache_dir=tmp_path).shape == (5, 384)
    assert calls == [table.texts[:5]]  # a sub-list is not a built-in vocabulary: the encoder runs
    assert semantics.packaged_embeddings(table.texts, SemanticsConfig(encoder="file", file="x.txt")) is None
