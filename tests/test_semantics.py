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
