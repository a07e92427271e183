"""config.py: every option has a help text and its default in --help; recipe files set defaults, flags override."""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest

import eval as eval_script
import train_lfpc
import train_mgpo
from config import check_config, parse_config, recipe_for, rollout_config


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


def test_a_real_checkpoint_without_config_gets_the_recipe_of_its_size(tmp_path, capsys):
    """The plain `torchrun ... train_mgpo.py --model <7B dir> --data train.jsonl` runs at the papers' settings."""
    checkpoint = tmp_path / "Qwen2.5-VL-7B-Instruct"
    checkpoint.mkdir()
    shutil.copy("configs/qwen2_5_vl_7b.json", checkpoint / "config.json")

    def parse(cls, name, argv):
        return parse_config(cls, argv, default_recipe=lambda args: recipe_for(name(args), args.model))

    mgpo = parse(train_mgpo.Config, lambda a: "mgpo", ["--model", str(checkpoint), "--data", "train.jsonl"])
    assert "recipes/mgpo_qwen2_5_vl_7b.yaml" in capsys.readouterr().out
    assert (mgpo.batch_size, mgpo.learning_rate, mgpo.global_max_pixels, mgpo.eval_samples) == (512, 1e-6, 1003520, 0)
    check_config(mgpo, 8)  # the demo's micro-batch of 16 and held-out report no longer stop it
    stage2 = parse(train_lfpc.Config, lambda a: f"lfpc_stage{a.stage}", ["--model", str(checkpoint), "--stage", "2",
                                                                          "--learning_rate", "1e-7"])
    assert (stage2.batch_size, stage2.num_generations, stage2.learning_rate) == (256, 16, 1e-7)  # the flag wins
    demo = parse(train_mgpo.Config, lambda a: "mgpo", [])  # tiny-base: the demo's own defaults
    assert (demo.batch_size, demo.learning_rate) == (8, 1e-4)
    shutil.copy("configs/qwen2_5_vl_32b.json", checkpoint / "config.json")  # no MGPO recipe for 32B
    with pytest.raises(SystemExit, match="qwen2_5_vl_32b.json.*pass --config"):
        parse(train_mgpo.Config, lambda a: "mgpo", ["--model", str(checkpoint)])
    shutil.copy("configs/qwen3_5_27b.json", checkpoint / "config.json")  # 64 x 5,120 like the 32B, another family
    with pytest.raises(SystemExit, match="qwen3_5_27b.json.*pass --config"):
        parse(train_mgpo.Config, lambda a: "mgpo", ["--model", str(checkpoint)])


def test_pixel_budgets_hold_one_visual_token_of_the_loaded_model():
    """Parsing stops under one token of every family (Qwen2.5-VL's 28 x 28 = 784 px); `rollout_config` stops under
    one token of the loaded model's processor: 1000 px is a token of Qwen2.5-VL (patch 14, merge 2) but not of
    Qwen3-VL (patch 16, merge 2: 32 x 32 = 1024 px)."""
    cfg = parse_config(train_mgpo.Config, ["--global_max_pixels", "1000", "--crop_max_pixels", "1024"])
    check_config(cfg, 1)
    size = {"shortest_edge": 784, "longest_edge": 50176}
    qwen2_5_vl = SimpleNamespace(patch_size=14, merge_size=2, size=size)
    assert rollout_config(cfg, qwen2_5_vl).global_max_pixels == 1000
    with pytest.raises(SystemExit, match=r"--global_max_pixels 1000 is under one visual token .*1024"):
        rollout_config(cfg, SimpleNamespace(patch_size=16, merge_size=2, size=size))
    with pytest.raises(SystemExit, match=r"--crop_max_pixels must be >= 784"):
        check_config(parse_config(train_mgpo.Config, ["--crop_max_pixels", "783"]), 1)


def test_an_unknown_thinking_choice_stops():
    with pytest.raises(SystemExit, match="--thinking 'maybe': use one of template, on, off"):
        check_config(parse_config(train_mgpo.Config, ["--thinking", "maybe"]), 1)
