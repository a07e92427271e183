"""The CPU demo's pipeline, a few steps (the learning run itself is README's main job, not a unit test): the
committed base loads, train_mgpo writes the held-out report before and after, the curves and the pictures, and its
"before" row is what eval.py measures on the same base."""

import json

from PIL import Image

from config import parse_config
from eval import Config as EvalConfig
from eval import evaluate
from train_mgpo import Config, train

TURNS = ["--max_new_tokens_turn1", "64", "--max_new_tokens_turn2", "12"]


def test_demo_pipeline_reports_before_and_after(tmp_path):
    out = tmp_path / "demo"
    train(parse_config(Config, TURNS + ["--max_steps", "2", "--batch_size", "2", "--num_generations", "2",
                                        "--micro_batch_size", "4", "--num_synthetic", "8", "--eval_samples", "4",
                                        "--eval_batch_size", "4",
                                        "--eval_pictures", "2", "--output_dir", str(out)]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    before = json.loads((out / "held_out_before.json").read_text())
    after = json.loads((out / "held_out_after.json").read_text())
    assert before["questions"] == after["questions"] == 4
    report = (out / "report.md").read_text()
    for name, m in (("before (step 0)", before), ("after (step 2)", after)):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert row.split("|")[2].strip() == f"{m['accuracy']:.3f}" and row.split("|")[4].strip() == \
            f"{m['crop_coverage']:.3f}"
    with Image.open(out / "curves.png") as curves:
        assert curves.size == (900, 300)
    for when in ("before", "after"):
        assert sorted(p.name for p in (out / "pictures" / when).iterdir()) == ["0000.png", "0001.png"]

    # eval.py on the committed base, same questions in the same order, greedy: the same answers and boxes
    runs = evaluate(parse_config(EvalConfig, TURNS + ["--model", "tiny-base", "--num_synthetic", "4", "--no_shuffle",
                                                      "--batch_size", "4", "--min_box_side", "27",
                                                      "--output_dir", str(tmp_path / "eval")]))
    for key in ("accuracy", "crop_iou", "crop_coverage", "crop_area_ratio", "valid_box_ratio"):
        assert runs["unprobed"][key] == before[key], key
