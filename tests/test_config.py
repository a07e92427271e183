"""config.py: every option has a help text and its default in --help; recipe files set defaults, flags override."""

import dataclasses
import json

import pytest

import eval as eval_script
import train_lfpc
import train_mgpo
from config import parse_config


@pytest.mark.parametrize("cls", [train_mgpo.Config, train_lfpc.Config, eval_script.Config])
def test_help_gives_every_option_a_text_and_its_default(cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, ["--help"], description="first line\n    indented line kept")
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert "first line indented line kept" in out
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert f"--{f.name}" in out
    assert out.count("(default: ") >= len(dataclasses.fields(cls)) + 1  # and --config's (--no_X repeats X's)


def test_a_recipe_file_sets_defaults_and_flags_override_it(tmp_path):
    yaml_recipe = tmp_path / "r.yaml"
    yaml_recipe.write_text("# a comment\nbatch_size: 512\nlearning_rate: 1.0e-6\nscale_by_std: false\n")
    cfg = parse_config(train_mgpo.Config, ["--config", str(yaml_recipe), "--learning_rate", "3e-6"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.scale_by_std, cfg.num_generations) == (512, 3e-6, False, 8)
    json_recipe = tmp_path / "r.json"
    json_recipe.write_text(json.dumps({"micro_batch_size": 2}))
    assert parse_config(train_mgpo.Config, ["--config", str(json_recipe)]).micro_batch_size == 2


@pytest.mark.parametrize("text, message", [("no_such_option: 1\n", r"unknown option\(s\) no_such_option"),
                                           ("[1, 2]\n", "expected a mapping"),
                                           ("a: [\n", "not valid YAML")])
def test_a_bad_recipe_stops_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message) as exit_info:
        parse_config(train_mgpo.Config, ["--config", str(path)])
    assert str(path) in str(exit_info.value)
    with pytest.raises(SystemExit, match="no such file"):
        parse_config(train_mgpo.Config, ["--config", str(tmp_path / "missing.yaml")])
