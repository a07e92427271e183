"""eval.py: the protocol (shuffling, HR-Bench rotation averaging), every mode, both probes, pictures, and the same
results from one process and from two under torchrun when the ranks have different numbers of questions."""

import json
import os
from dataclasses import asdict
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import rollout
from config import parse_config
from crop import crop_original, resize_for_model
from data import Sample
from demo.synthetic import synthetic_samples
from eval import (Config, accuracy, by_first_crop, evaluate, first_crop_class, prompt_wording, protocol_samples,
                  rank_share, shuffle_options)
from family import QWEN2_5_VL, QWEN3_VL
from prompts import MGPO_PROMPTS
from tests.test_fsdp import ROOT

FAST = ["--num_synthetic", "4", "--max_new_tokens", "8", "--max_new_tokens_turn1", "12", "--max_new_tokens_turn2",
        "8", "--max_new_tokens_per_turn", "8", "--max_response_tokens", "24"]


def test_shuffled_answer_follows_its_option():
    s = Sample("q7", None, "Which?", ["red", "green", "blue", "black"], "C", None)
    orders = set()
    for seed in range(20):
        t = shuffle_options(s, seed)
        assert sorted(t.options) == sorted(s.options)
        assert t.options["ABCD".index(t.answer)] == "blue"
        orders.add(tuple(t.options))
    assert len(orders) > 5  # the order really changes with the seed
    assert shuffle_options(s, 3) == shuffle_options(s, 3)


def test_protocol_leaves_hrbench_and_no_shuffle_alone():
    s = Sample("q", None, "Which?", ["a", "b", "c", "d"], "A", None)
    h = Sample("h", None, "Which?", ["a", "b", "c", "d"], "A", None, meta={"benchmark": "hrbench"})
    assert protocol_samples([h], Config())[0] == h
    assert protocol_samples([s], Config(no_shuffle=True))[0] == s
    assert len(protocol_samples([s] * 5, Config(limit=2))) == 2


def test_hrbench_accuracy_is_averaged_over_rotation_groups():
    rows = [{"id": f"a{i}", "cycle": "A", "correct": c} for i, c in enumerate([True, False, False, False])]
    rows += [{"id": f"b{i}", "cycle": "B", "correct": True} for i in range(2)]
    assert accuracy(rows) == pytest.approx((0.25 + 1.0) / 2)  # not the row mean 0.5
    plain = [{"id": f"q{i}", "cycle": None, "correct": c} for i, c in enumerate([True, False, True])]
    assert accuracy(plain) == pytest.approx(2 / 3)


@pytest.mark.parametrize("mode", ["direct", "mgpo", "tool"])
def test_each_mode_runs_and_writes_results(mode, tmp_path):
    out = tmp_path / mode
    cfg = parse_config(Config, FAST + ["--mode", mode, "--output_dir", str(out)])
    parsed = asdict(cfg)
    runs = evaluate(cfg)
    assert asdict(cfg) == parsed  # budgets resolved into a RolloutConfig, not into the parsed config
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"]["mode"] == mode and result["protocol"]["prompts"]
    assert result["protocol"]["global_max_pixels"] > 0  # the image processor's, resolved (--global_max_pixels 0)
    assert runs["unprobed"]["questions"] == 4 and len(result["records"]["unprobed"]) == 4
    assert 0.0 <= runs["unprobed"]["accuracy"] <= 1.0
    assert runs["unprobed"]["visual_tokens_per_question"] >= 64  # the 224x224 global view
    assert "| unprobed |" in (out / "results.md").read_text()


CROP_CFG = SimpleNamespace(min_pixels=784, crop_max_pixels=112 * 112)


def test_gt_probe_crops_the_ground_truth_box():
    sample = synthetic_samples(1, seed=2)[0]
    original = sample.image
    traj = SimpleNamespace(sample=sample, family=QWEN2_5_VL, crop_boxes=[], input_size=(224, 224),
                           original_size=original.size)
    got = rollout.cut_crop(traj, original, [0, 0, 50, 50], CROP_CFG, "gt")
    expected = resize_for_model(crop_original(original, sample.boxes[0]), 784, 112 * 112, 28)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert traj.crop_boxes == [[0.0, 0.0, 200.0, 200.0]]  # the prediction is still what gets recorded


def test_noise_probe_keeps_the_size_but_not_the_content():
    sample = synthetic_samples(1, seed=2)[0]
    traj = SimpleNamespace(sample=sample, family=QWEN2_5_VL, crop_boxes=[], input_size=(224, 224),
                           original_size=sample.image.size)
    clean = rollout.cut_crop(traj, sample.image, [10, 10, 90, 60], CROP_CFG, "none")
    noise = rollout.cut_crop(traj, sample.image, [10, 10, 90, 60], CROP_CFG, "noise")
    assert noise.size == clean.size and not np.array_equal(np.asarray(noise), np.asarray(clean))
    assert abs(np.asarray(noise).mean() - 127.5) < 5  # uniform noise (then resized like any crop)


@pytest.mark.parametrize("probe", ["gt", "noise"])
def test_probe_run_reports_the_accuracy_change_and_pictures(probe, tmp_path):
    out = tmp_path / "probe"
    runs = evaluate(parse_config(Config, FAST + ["--mode", "tool", "--probe", probe, "--save_vis", "1",
                                                 "--output_dir", str(out)]))
    assert runs[f"probe_{probe}"]["questions"] == runs["unprobed"]["questions"] == 4
    change = runs[f"probe_{probe}"]["accuracy"] - runs["unprobed"]["accuracy"]
    assert runs[f"accuracy_change_{probe}"] == pytest.approx(change)
    assert sorted(os.listdir(out / "vis")) == ["0000.png"]
    with Image.open(out / "vis" / "0000.png") as picture:
        assert picture.format == "PNG" and picture.width > 0


def test_bad_options_stop_with_their_name():
    for argv, flag in [(["--mode", "zoom"], "--mode"), (["--probe", "blur"], "--probe"),
                       (["--mode", "direct", "--probe", "gt"], "--probe"), (["--temperature", "-1"], "--temperature")]:
        with pytest.raises(SystemExit, match=flag):
            evaluate(parse_config(Config, argv))


def test_every_rank_answers_as_many_questions_and_each_is_recorded_once():
    assert rank_share(9, 0, 2) == ([0, 2, 4, 6, 8], 5)  # the docstring's example
    assert rank_share(9, 1, 2) == ([1, 3, 5, 7, 7], 4)
    assert rank_share(2, 3, 4) == ([0], 0)  # fewer questions than ranks: a stand-in, nothing recorded
    assert rank_share(0, 1, 2) == ([], 0)
    for count in range(12):
        for world_size in (1, 2, 3, 8):
            shares = [rank_share(count, rank, world_size) for rank in range(world_size)]
            assert len({len(share) for share, _ in shares}) == 1  # the same batches on every rank
            assert sorted(i for share, recorded in shares for i in share[:recorded]) == list(range(count))


def torchrun_or_stop(args, timeout):
    """`torchrun --nproc_per_node 2 args` that fails the test when it has not finished after `timeout` seconds
    (a hang would otherwise block the suite for distributed.COLLECTIVE_TIMEOUT). SIGTERM, not SIGKILL: torchrun
    then ends its workers, which run in sessions of their own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            out, _ = p.communicate()
            pytest.fail(f"torchrun {' '.join(args)}: no result after {timeout} s (a hang)\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]


@pytest.mark.parametrize("mode", ["direct", "mgpo", "tool"])
def test_two_ranks_with_uneven_batches_finish_and_match_one_process(mode, tmp_path):
    # 9 questions, 2 ranks, 4 per batch: rank 0 has 5 questions (2 batches), rank 1 has 4 (1 batch); each rank
    # holds the whole model, so nothing but the final gather waits for the other rank
    common = [*FAST, "--model", "tiny-base", "--num_synthetic", "9", "--batch_size", "4", "--mode", mode]
    torchrun_or_stop(["eval.py", *common, "--output_dir", str(tmp_path / "two")], timeout=120)
    evaluate(parse_config(Config, [*common, "--output_dir", str(tmp_path / "one")]))
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    drop_time = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "seconds_per_question")}
    assert [drop_time(r) for r in two["records"]["unprobed"]] == [drop_time(r) for r in one["records"]["unprobed"]]
    assert drop_time(two["runs"]["unprobed"]) == drop_time(one["runs"]["unprobed"])
    assert [r["index"] for r in two["records"]["unprobed"]] == list(range(9))


def test_answers_are_split_by_their_first_crops_coverage():
    def rec(coverages, correct, has_boxes=True):
        return {"coverage": coverages, "correct": correct, "has_boxes": has_boxes}
    # the docstring's example, plus a question without ground truth (left out) and a second crop that is ignored
    records = [rec([1.0], True), rec([0.95, 0.0], False), rec([0.0, 1.0], False), rec([], True), rec([], False, False)]
    split = by_first_crop(records)
    assert split["covers"] == {"share": 0.5, "accuracy": 0.5}
    assert split["misses"] == {"share": 0.25, "accuracy": 0.0}
    assert split["no crop"] == {"share": 0.25, "accuracy": 1.0}
    assert split["partial"] == {"share": 0.0, "accuracy": None}
    assert first_crop_class(rec([0.5], True)) == "partial" and first_crop_class(rec([0.89], True)) == "partial"
    assert by_first_crop([rec([], True, False)])["covers"] == {"share": None, "accuracy": None}


def test_sampled_decoding_is_seeded_and_says_so(tmp_path):
    texts = {}
    for name, extra in [("greedy", []), ("sampled", ["--temperature", "1.0"]), ("again", ["--temperature", "1.0"])]:
        out = tmp_path / name
        evaluate(parse_config(Config, FAST + ["--mode", "mgpo", "--output_dir", str(out)] + extra))
        result = json.loads((out / "results.json").read_text())
        texts[name] = [r["text"] for r in result["records"]["unprobed"]]
        assert result["protocol"]["decoding"] == ("greedy" if name == "greedy" else "sampled, temperature 1.0")
        assert result["config"]["temperature"] == (0.0 if name == "greedy" else 1.0)  # as given on the command line
    assert texts["sampled"] == texts["again"]  # --seed fixes the draws
    assert texts["sampled"] != texts["greedy"]  # the untrained tiny model's samples are not its argmax


def test_results_print_the_prompts_in_the_models_frame():
    """results.json names the wording the model was asked in: a relative-frame family's asks for 0..1000 boxes."""
    assert prompt_wording("mgpo", QWEN2_5_VL)["turn1"] == MGPO_PROMPTS.turn1
    assert "from 0 to 1000" in prompt_wording("mgpo", QWEN3_VL)["turn1"]
    assert "from 0 to 1000" in prompt_wording("tool", QWEN3_VL)["system"]
