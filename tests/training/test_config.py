"""Config files: defaults, and malformed configs rejected with an error naming the field."""

import pytest

from training.config import Config, ConfigError, config_from_dict, load_config


def _base():
    return {"data": {"systems": ["x"]}}


def test_defaults_are_deepmd_like():
    cfg = config_from_dict(_base())
    assert isinstance(cfg, Config)
    assert cfg.descriptor.type == "se_e2_a"
    assert cfg.network.embedding == [25, 50, 100] and cfg.network.axis == 16
    assert cfg.training.pref_f_start == 1000.0


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"training": {"stepz": 3}}, "training.stepz"),
        ({"training": {"steps": "many"}}, "training.steps"),
        ({"training": {"steps": -1}}, "training.steps"),
        ({"descriptor": {"type": "se_e3"}}, "descriptor.type"),
        ({"network": {"precision": "float16"}}, "network.precision"),
        ({"data": {"systems": []}}, "data.systems"),
        ({"data": {"systems": ["x"], "val_fraction": 1.5}}, "data.val_fraction"),
        ({"optimizer": {}}, "optimizer"),
    ],
)
def test_malformed_config_names_the_field(patch, field):
    d = _base()
    for k, v in patch.items():
        d[k] = {**d.get(k, {}), **v}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict(d)


def test_bad_toml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[training\nsteps = 3")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(p)


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml")):
        load_config(p)


def test_yaml_config_reads_as_the_toml_one(tmp_path):
    import os
    from pathlib import Path

    import yaml

    toml = Path(__file__).resolve().parents[2] / "configs" / "water-se.toml"
    ref = load_config(toml)
    d = ref.to_dict()
    d["data"]["systems"] = [os.path.relpath(p, tmp_path) for p in ref.data.systems]
    (tmp_path / "water-se.yaml").write_text(yaml.safe_dump(d))
    assert load_config(tmp_path / "water-se.yaml").to_dict() == ref.to_dict()  # relative paths: from the file too
    (tmp_path / "bad.yml").write_text("training: [steps: 3")
    with pytest.raises(ConfigError, match="bad.yml: not valid YAML"):
        load_config(tmp_path / "bad.yml")
    (tmp_path / "list.yaml").write_text("- training\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("training:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="stpes"):
        load_config(tmp_path / "typo.yaml")
