"""Config: defaults, YAML + dotted overrides with coercion, validation messages, --help."""
import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from fastft.config import Config, all_keys, from_dict, load_config, parse_overrides, save_config
from fastft.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert cfg.finetune.mode == "lora" and cfg.lora.r == 16 and cfg.model.path == "default"


def test_yaml_then_overrides_with_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: 4\n  target_modules: [q_proj]\ntrain:\n  lr: 1.0e-3\n  epochs: 2\n")
    cfg = load_config(str(p), ["--lora.r", "8", "--train.lr=3e-4", "--model.gradient_checkpointing", "yes",
                               "--lora.target_modules", "q_proj,v_proj, o_proj", "--model.gguf_file", "none",
                               "--model.dropout", "0.1"])
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert cfg.model.gguf_file is None and cfg.model.dropout == 0.1


@pytest.mark.parametrize("args, needle", [
    (["--lora.rr", "8"], "did you mean 'lora.r'"),
    (["--lr", "1e-3"], "did you mean 'train.lr'"),
    (["--trian.lr", "1e-3"], "did you mean 'train.lr'"),
    (["--train.lr", "-1"], "train.lr=-1.0: expected a value > 0.0"),
    (["--lora.r", "0"], "lora.r=0: expected a value >= 1"),
    (["--train.batch_size", "2.5"], "train.batch_size='2.5': expected int"),
    (["--train.lr", "fast"], "train.lr='fast': expected float"),
    (["--model.gradient_checkpointing", "maybe"], "expected true or false"),
    (["--finetune.mode", "qlora"], "finetune.mode='qlora': expected one of full, partial, lora, head"),
    (["--train.max_steps", "5", "--train.warmup_steps", "5"], "warmup must be shorter than the run"),
    (["--finetune.frozen_regex", "("], "not a valid regex"),
    (["--lora.r"], "needs a value"),
])
def test_bad_values_name_key_value_and_expectation(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainn:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(str(p))
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(p))
    p.write_text("train:\n  lr: true\n")
    with pytest.raises(ConfigError, match="train.lr=True: expected float"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--lora.r", "4", "--train.scheduler", "linear", "--data.max_length", "64"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == [("a.b", "1"), ("c.d", "x=y")]
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["stray"])


def test_help_documents_every_key():
    from fastft.train.cli import train

    out = CliRunner().invoke(train, ["--help"]).output
    for key in all_keys():
        assert f"--{key} " in out, key
    assert len(all_keys()) == sum(len(dataclasses.fields(getattr(Config(), s))) for s in
                                  ("model", "finetune", "lora", "data", "train", "output"))


EXAMPLES = sorted((__import__("pathlib").Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", [str(p) for p in EXAMPLES if not p.name.startswith("space_")])
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.output.dir  # examples name their run directory


@pytest.mark.parametrize("path", [str(p) for p in EXAMPLES if p.name.startswith("space_")])
def test_example_search_spaces_validate(path):
    """examples/space_X.yaml is a `fastft search` space for examples/search_X.yaml."""
    from fastft.search.space import load_space

    base = load_config(path.replace("space_", "search_"))
    assert load_space(path, base).params
