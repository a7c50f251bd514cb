import pytest

from reprlab.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    PretrainConfig,
    load_config,
    parse_overrides,
    save_config,
)


def test_defaults_and_overrides():
    cfg = load_config(PretrainConfig, None, ["optim.lr=0.3", "train.epochs=5", "encoder.kwargs={cifar_stem: true}"])
    assert cfg.optim.lr == 0.3 and cfg.train.epochs == 5 and cfg.encoder.kwargs == {"cifar_stem": True}
    assert cfg.method.name == "simclr"


def test_unknown_override_key_names_key_and_valid_ones():
    # (unknown keys and wrong types in a YAML file: tests/test_errors.py)
    with pytest.raises(ConfigError, match=r"'optim.learning_rate'.*'lr'"):
        load_config(PretrainConfig, None, ["optim.learning_rate=0.1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(PretrainConfig, None, ["train.batch_size=1.5"])


def test_int_is_accepted_for_float_but_bool_is_not_an_int():
    assert load_config(PretrainConfig, None, ["optim.lr=1"]).optim.lr == 1
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, None, ["train.epochs=true"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_round_trip(tmp_path):
    cfg = load_config(FinetuneConfig, None, ["encoder=runs/x", "seeds=[0, 1]", "augment.crop_scale=null"])
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(FinetuneConfig, tmp_path / "out.yaml")
    assert again == cfg
    assert again.augment.crop_scale is None


def test_augmentation_sections_are_the_pipelines_themselves(tmp_path):
    from reprlab.data.views import FinetuneAugment, ViewAugment

    cfg = load_config(FinetuneConfig, None, ["augment.mixup_alpha=0.2", "augment.crop_scale=[0.5, 1.0]"])
    assert cfg.augment == FinetuneAugment(crop_scale=(0.5, 1.0), mixup_alpha=0.2)  # tuple, as declared
    with pytest.raises(ConfigError, match=r"'augment.mixup'; valid keys here: .*'mixup_alpha'"):
        load_config(FinetuneConfig, None, ["augment.mixup=0.2"])

    views = load_config(EvaluateConfig).alignment_views
    assert views == ViewAugment(crop_scale=(0.2, 1.0), flip_p=0.5, jitter_strength=0.5, jitter_p=0.8,
                                grayscale_p=0.2, blur_p=0.0)
    cfg = load_config(EvaluateConfig, None, ["alignment_views.flip_p=0", "alignment_views.blur_p=5e-1"])
    assert cfg.alignment_views.flip_p == 0 and cfg.alignment_views.blur_p == 0.5
    assert cfg.alignment_views.crop_scale == (0.2, 1.0)  # keys left out keep the stage's defaults, not ViewAugment's
    save_config(cfg, tmp_path / "eval.yaml")
    assert load_config(EvaluateConfig, tmp_path / "eval.yaml") == cfg
    with pytest.raises(ConfigError, match=r"'alignment_views.solarise_p'; valid keys here: .*'solarize_p'"):
        load_config(EvaluateConfig, None, ["alignment_views.solarise_p=0.2"])
    with pytest.raises(ConfigError, match="'alignment_views' must be a mapping"):
        load_config(EvaluateConfig, None, ["alignment_views=null"])


def test_a_partly_given_section_keeps_the_stages_own_defaults():
    cfg = load_config(FinetuneConfig, None, ["optim.weight_decay=0", "train.epochs=3"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-3, 0)  # not OptimConfig()'s sgd
    assert cfg.train.batch_size == 128


def test_fixed_length_tuples_check_their_length():
    with pytest.raises(ConfigError, match="'augment.crop_scale' must be"):
        load_config(FinetuneConfig, None, ["augment.crop_scale=[0.5]"])
    with pytest.raises(ConfigError, match="'optim.betas' must be"):
        load_config(PretrainConfig, None, ["optim.betas=[0.9, 0.99, 0.999]"])


def test_evaluate_list_override():
    cfg = load_config(EvaluateConfig, None, ["encoders=[runs/a, random, pixels]"])
    assert list(cfg.encoders) == ["runs/a", "random", "pixels"]


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/**/*.yaml")))
def test_every_shipped_config_loads(path):
    stage = path.parent.name
    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval": EvaluateConfig}[stage]
    load_config(cls, path)


def test_yaml_exponent_without_dot_is_a_float():
    assert load_config(PretrainConfig, None, ["optim.weight_decay=1e-6"]).optim.weight_decay == 1e-6
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(PretrainConfig, None, ["optim.lr=fast"])


def test_readme_documents_every_config_key():
    import dataclasses
    import typing
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()

    def all_keys(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from all_keys(hints[f.name])

    missing = sorted({k for cls in (PretrainConfig, FinetuneConfig, EvaluateConfig) for k in all_keys(cls)
                      if f"`{k}`" not in readme})
    assert not missing, f"README's configuration reference lacks {missing}"
