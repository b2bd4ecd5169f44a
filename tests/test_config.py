from pathlib import Path

import pytest

from pading.config import (
    ExperimentConfig,
    load_config,
    parse_override,
    save_config,
    tiny_config,
)
from pading.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    cfg = ExperimentConfig()
    assert cfg.generator.num_primitives == 400 and cfg.generator.num_layers == 3
    assert cfg.losses.disentangle_weight == 1e-4 and cfg.losses.alignment_temperature == 0.1
    assert cfg.generator_training.unseen_class_weight == 5.0 and cfg.generator_training.no_object_class_weight == 0.1
    assert cfg.segmenter.num_queries == 100 and cfg.segmenter.hidden_dim == 256
    assert cfg.inference.object_mask_threshold == 0.8


def test_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("segmenter:\n  preset: tiny\ngenerator:\n  num_primitives: 50\n")
    cfg = load_config(path, ["generator.num_primitives=200", "losses.variant=gmmn"])
    assert cfg.generator.num_primitives == 200 and cfg.losses.variant == "gmmn"
    assert cfg.segmenter.hidden_dim == 64  # tiny preset fills in sizes
    with pytest.raises(ConfigError, match="num_primitivs"):
        load_config(path, ["generator.num_primitivs=3"])
    with pytest.raises(ConfigError, match="generator.num_primitives: expected an integer"):
        load_config(path, ["generator.num_primitives=abc"])
    with pytest.raises(ConfigError, match="losses.variant"):
        load_config(path, ["losses.variant=nope"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("novalue")


def test_presets_are_applied_by_the_object_and_explicit_keys_win():
    from pading.config import SegmenterConfig

    tiny = SegmenterConfig(preset="tiny")
    assert tiny.hidden_dim == 64 and tiny.num_queries == 16  # not the R50 sizes
    assert SegmenterConfig(preset="tiny", num_queries=32).num_queries == 32
    assert SegmenterConfig().hidden_dim == 256 and SegmenterConfig().backbone_depths == (3, 4, 6, 3)
    assert load_config(None, ["segmenter.preset=tiny"]).segmenter.hidden_dim == 64
    with pytest.raises(ConfigError, match="must divide"):
        SegmenterConfig(preset="tiny", num_heads=5)


def test_choices_and_ranges_are_checked_at_load():
    with pytest.raises(ConfigError, match="losses.alignment_seen_features must be one of synthetic, real"):
        load_config(None, ["losses.alignment_seen_features=fake"])
    with pytest.raises(ConfigError, match="ray.placement_strategy must be one of"):
        load_config(None, ["ray.placement_strategy=ANYWHERE"])
    with pytest.raises(ConfigError, match="dropout"):
        load_config(None, ["generator.dropout=1.5"])
    with pytest.raises(ConfigError, match="pretrain.lr"):
        load_config(None, ["pretrain.lr=0"])


def test_save_load_roundtrip(tmp_path):
    cfg = tiny_config(generator={"num_primitives": 7})
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert cfg.flat()["generator.num_primitives"] == 7


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"demo", "smoke", "zsp_coco", "zsi_coco_48_17", "zsi_coco_65_15", "zss_cocostuff", "zsi_coco_tiny"} <= names
    for f in files:
        load_config(f)


def test_text_fields_take_the_text_as_typed():
    # YAML 1.1 reads 10:30 as 630 (base 60), 0x1F as 31 and yes as true: a text field keeps what was typed.
    cfg = load_config(None, ["data.split=10:30", "tracking.experiment=0x1F", "name=yes", "data.max_val_images=0x1F"])
    assert cfg.data.split == "10:30" and cfg.tracking.experiment == "0x1F" and cfg.name == "yes"
    assert cfg.data.max_val_images == 31  # a number field still reads YAML's number
    assert load_config(None, ["pretrain.lr=1e-4"]).pretrain.lr == 1e-4


def test_setting_inside_a_switched_off_section_is_refused():
    # data.synthetic is null by default: setting one of its keys must not switch on a synthetic dataset.
    with pytest.raises(ConfigError, match=r"data.synthetic is off .*--set 'data.synthetic=\{seed: 3\}'"):
        load_config(None, ["data.synthetic.seed=3"])
    assert load_config(None, ["data.synthetic={seed: 3}"]).data.synthetic.seed == 3
    refined = load_config(None, ["data.synthetic={seed: 3}", "data.synthetic.num_train=5", "name=7 # a comment"])
    assert (refined.data.synthetic.seed, refined.data.synthetic.num_train, refined.name) == (3, 5, "7")
    demo = load_config(REPO / "configs" / "demo.yaml", ["data.synthetic.seed=3"])  # on in the file: fine
    assert demo.data.synthetic.seed == 3 and demo.data.synthetic.num_train == 400
