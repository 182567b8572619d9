"""The training config: defaults, types, unknown keys, round trip."""

import pytest

from imret.train.config import TrainConfig, config_from_dict, load_config, save_config


def test_round_trip_and_defaults(tmp_path):
    cfg = config_from_dict({"epochs": 3, "loss": {"name": "ap", "bins": 25}, "optim": {"lr": 1e-5},
                            "model": {"backbone": "resnet18", "whitening": 128}, "multistage": True})
    assert cfg.loss.bins == 25 and cfg.optim.lr == 1e-5 and cfg.model.whitening == 128 and cfg.model.pool == "gem"
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert TrainConfig() == config_from_dict({})
    dolg = config_from_dict({"model": {"head": "dolg", "head_kwargs": {"fusion": "concat", "atrous_rates": [2, 4]}}})
    assert dolg.model.head_kwargs == {"fusion": "concat", "atrous_rates": [2, 4]}
    save_config(dolg, tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml") == dolg


@pytest.mark.parametrize("bad, match", [
    ({"epoch": 3}, r"unknown key\(s\) \['epoch'\] in the config; valid: out, epochs"),
    ({"loss": {"nme": "ap"}}, r"unknown key\(s\) \['nme'\] in loss"),
    ({"loss": {"name": "focal"}}, "loss.name: unknown value 'focal'; available: contrastive, triplet, ap, arcface"),
    ({"epochs": "ten"}, "epochs: expected an integer"),
    ({"multistage": "yes"}, "multistage: expected true/false"),
    ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
    ({"multistage": True, "model": {"freeze_batchnorm": False}}, "freeze_batchnorm"),
    ({"model": []}, "model: expected a mapping"),
    ({"loss": {"name": "focal"}}, "available: contrastive, triplet, ap, arcface, curricularface"),
    ({"model": {"head": "dolgg"}}, "model.head: unknown value 'dolgg'; available: dolg, global"),
    ({"model": {"head_kwargs": [1, 2]}}, "model.head_kwargs: expected a mapping with string keys"),
    ({"mining": {"batches_per_epoch": 0}}, "mining.batches_per_epoch must be >= 1 or null"),
])
def test_errors_name_the_key_and_the_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(bad)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("epochs: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_config(p)
