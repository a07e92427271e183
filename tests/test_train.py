"""train_mgpo.py: options, start-up checks that name the flag, and one real step end to end on CPU."""

import json
from dataclasses import asdict

import pytest

from config import check_config, parse_config
from tests.helpers import TINY_MGPO
from train_mgpo import Config, train

FAST = TINY_MGPO + ["--max_steps", "2", "--max_new_tokens_turn1", "12", "--max_new_tokens_turn2", "6",
                    "--num_synthetic", "16"]


def test_every_field_is_a_flag_and_help_lists_them(capsys):
    cfg = parse_config(Config, ["--learning_rate", "3e-6", "--scale_by_std", "false", "--model", "/x"])
    assert (cfg.learning_rate, cfg.scale_by_std, cfg.model, cfg.batch_size) == (3e-6, False, "/x", 8)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Config, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in Config.__dataclass_fields__:
        assert f"--{name}" in out


def test_bad_flags_stop_with_their_name(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--no_such_option", "1"])
    assert "--no_such_option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Config, ["--scale_by_std", "maybe"])
    assert "--scale_by_std" in capsys.readouterr().err
    for argv, world, flag in [(["--num_generations", "1"], 1, "--num_generations"),
                              (["--batch_size", "3"], 2, "--batch_size"),
                              (["--micro_batch_size", "3"], 1, "--micro_batch_size"),
                              (["--mini_batch_size", "5"], 1, "--mini_batch_size"),
                              (["--global_max_pixels", "100"], 1, "--global_max_pixels"),
                              (["--loss_agg", "sum"], 1, "--loss_agg"),
                              (["--data", "train.jsonl", "--eval_samples", "8"], 1, "--eval_data"),
                              (["--eval_samples", "3"], 2, "--eval_samples")]:
        with pytest.raises(SystemExit, match=flag):
            check_config(parse_config(Config, argv), world)


def test_two_steps_end_to_end(tmp_path):
    out = tmp_path / "run"
    cfg = parse_config(Config, FAST + ["--output_dir", str(out), "--learning_rate", "1e-3", "--save_steps", "1"])
    parsed = asdict(cfg)
    train(cfg)
    assert asdict(cfg) == parsed  # budgets and mini-batch are resolved elsewhere (ctx.rollout, grpo_update)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "accuracy", "valid_box_ratio", "iou", "coverage", "response_tokens", "clip_frac", "kl",
                "grad_norm", "seconds", "rollout_tokens_per_s", "update_tokens_per_s", "format_ok"):
        assert key in rows[0], key
    assert 0 <= rows[0]["accuracy"] <= 1 and rows[0]["response_tokens"] <= 18
    assert (out / "checkpoint-1" / "model.safetensors").exists() and (out / "checkpoint-2" / "config.json").exists()


def test_kl_to_the_frozen_reference(tmp_path, monkeypatch):
    """kl_coef > 0 builds the reference: KL is 0 while the policy equals it, > 0 once the policy has moved."""
    import train_mgpo
    monkeypatch.setattr(train_mgpo, "mgpo_reward", lambda traj, cfg: float(len(traj.texts[-1]) % 3 == 0))
    out = tmp_path / "kl"
    train(parse_config(Config, FAST + ["--output_dir", str(out), "--learning_rate", "1e-2", "--kl_coef", "0.1"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[1]["kl"] > 1e-6


def test_direct_baseline_answers_in_one_turn(tmp_path):
    """--direct: GRPO on one answer from the global view; no box, so no box metrics, and at most turn 2's tokens."""
    out = tmp_path / "direct"
    train(parse_config(Config, FAST + ["--output_dir", str(out), "--direct", "true", "--max_steps", "1"]))
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "accuracy", "response_tokens", "loss"} <= set(row) and "valid_box_ratio" not in row
    assert row["response_tokens"] <= 6  # --max_new_tokens_turn2 6
