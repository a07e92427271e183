"""The options of a run and their checks: `TrainConfig` (what both training scripts share; each script subclasses
it), `check_config`, `recipe_for` (the papers' settings for a checkpoint's size), and `RolloutConfig` (what a
rollout reads, resolved once at start-up; the parsed config is never changed after parsing).

Command lines and recipe files for a script's config dataclass, through transformers' `HfArgumentParser`.

Every field is declared with `opt(default, help)`, so `--help` lists each option with its help text and default.
A recipe file (YAML or JSON, `--config recipes/mgpo_qwen2_5_vl_7b.yaml`) sets defaults; flags on the command line
override it:

    >>> @dataclass
    ... class Config:
    ...     learning_rate: float = opt(1e-6, "AdamW learning rate")
    ...     use_kl: bool = opt(False, "add the KL term")
    >>> parse_config(Config, ["--learning_rate", "3e-6", "--use_kl"])
    Config(learning_rate=3e-06, use_kl=True)
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass

import yaml
from transformers import HfArgumentParser

from chat import THINKING
from family import FAMILIES
from memory import CONFIGS, load_model_config


def opt(default, help):
    """A config field with its default and the help text `--help` prints."""
    return dataclasses.field(default=default, metadata={"help": help})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help, and the script's docstring as written (not reflowed)."""


def read_recipe(path, cls):
    """{field: value} of a YAML or JSON recipe file; an unknown key or an unreadable file stops the run."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --config {path!r}: no such file")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f) or {}  # JSON is YAML too
        except yaml.YAMLError as e:
            raise SystemExit(f"error: --config {path!r}: not valid YAML or JSON ({e})")
    if not isinstance(recipe, dict):
        raise SystemExit(f"error: --config {path!r}: expected a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise SystemExit(f"error: --config {path!r}: unknown option(s) {', '.join(unknown)}")
    return recipe


def parse_config(cls, argv=None, description=None, default_recipe=None):
    """An instance of dataclass `cls`: its defaults, then the `--config` recipe file's values, then the command
    line's flags. Unknown or malformed flags stop with argparse's message naming the flag.

    `default_recipe(args)`: the recipe to use when no --config is given (e.g. the papers' settings for the
    checkpoint's size), or ''. It sees the options parsed without a recipe."""
    parser = HfArgumentParser(cls, description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default="", help="a recipe file (YAML or JSON) of option: value; flags override "
                                                     "it. Without it a real checkpoint gets recipes/ for its size")
    args = parser.parse_args(argv)
    recipe = args.config or (default_recipe(args) if default_recipe else "")
    if recipe:
        if not args.config:
            print(f"no --config: using {recipe}, the recipe for this checkpoint's size (flags override it)")
        parser.set_defaults(**read_recipe(recipe, cls))
        args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class TrainConfig:
    model: str = opt("tiny", "'tiny', 'tiny-base', 'tiny-tool-base' or a local Qwen2.5-VL checkpoint")
    data: str = opt("synthetic", "'synthetic' or a JSONL of samples (DESIGN.md)")
    num_synthetic: int = opt(256, "samples generated for --data synthetic")
    output_dir: str = opt("out/run", "where checkpoints, metrics.jsonl and reports go")
    max_steps: int = opt(10, "GRPO steps (rollout batches)")
    batch_size: int = opt(4, "prompts per step, over all ranks")
    num_generations: int = opt(4, "rollouts per prompt (the GRPO group)")
    learning_rate: float = opt(1e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    seed: int = opt(0, "data order and sampling (each rank adds its rank)")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (and of the log-probs trained on)")
    global_max_pixels: int = opt(0, "pixel budget of the global view; 0: the checkpoint's image processor's")
    crop_max_pixels: int = opt(0, "pixel budget of each crop; 0: same as the global view's")
    mini_batch_size: int = opt(0, "trajectories per optimizer step per rank; 0: the whole rollout batch")
    micro_batch_size: int = opt(4, "trajectories per forward/backward per rank")
    max_tokens_per_micro_batch: int = opt(0, "micro-batches by length of <= N padded tokens; 0: by micro_batch_size")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    min_box_side: int = opt(28, "a box is valid when both sides are over this many model-input pixels (MGPO: 28)")
    rollout_batch_size: int = opt(0, "at most N trajectories per generate call on each rank; 0: all in one call")
    gradient_checkpointing: bool = opt(False, "recompute decoder layers and vision blocks in backward (saves memory)")
    freeze_vision_tower: bool = opt(False, "train the language model only (verl's name)")
    attn_implementation: str = opt("sdpa", "passed to from_pretrained: 'sdpa', 'eager' or 'flash_attention_2'")
    thinking: str = opt("template", "Qwen3.5's enable_thinking: template (as shipped), on or off")
    clip_eps_low: float = opt(0.2, "PPO clip: the ratio is clipped below at 1 - clip_eps_low")
    clip_eps_high: float = opt(0.2, "PPO clip: the ratio is clipped above at 1 + clip_eps_high")
    clip_ratio_c: float = opt(3.0, "dual clip: a negative advantage's token loss is at most -A * c (verl's 3; 0: off)")
    kl_coef: float = opt(0.0, "k3 KL to the initial policy; the reference is only built when > 0")
    kl_clamp: float = opt(10.0, "cap on each token's k3 KL, as verl's low_var_kl (0: no cap)")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight tokens by min(p_train / p_rollout, C); 0: off")
    loss_agg: str = opt("token_mean", "'token_mean' over the global batch, or 'seq_mean'")
    scale_by_std: bool = opt(True, "False: Dr.GRPO advantages (no division by the group std)")
    max_grad_norm: float = opt(1.0, "gradient norm clip per optimizer step")
    save_steps: int = opt(0, "save a checkpoint every N steps (0: only at the end)")
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0: keep all)")
    resume: bool = opt(False, "continue from the newest complete checkpoint in output_dir")
    max_nonfinite_steps: int = opt(3, "stop after this many steps in a row whose update was non-finite")
    skip_bad_samples: bool = opt(False, "skip (and count) unusable samples instead of stopping before training")
    eval_samples: int = opt(0, "held-out questions answered before and after training (report.py); 0: none")
    eval_data: str = opt("", "their benchmark file; '': the synthetic held-out split (--data synthetic)")
    eval_batch_size: int = opt(16, "held-out questions per generate call")
    eval_pictures: int = opt(4, "trajectory pictures of the first N held-out questions, before and after")


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def check_config(cfg, world_size, extra=()):
    """Stop at start-up, naming the flag, when a value cannot work. `extra`: the recipe's own (ok, message)."""
    per_rank_trajs = cfg.batch_size // max(world_size, 1) * cfg.num_generations
    # the model is not loaded yet: a budget under one visual token of every family stops here, one under the
    # loaded model's own token (Qwen3-VL: 32 x 32 px) in `rollout_config`
    floor = min(f.factor for f in FAMILIES) ** 2
    checks = [
        (cfg.num_generations >= 2, "--num_generations must be >= 2 (group advantages need a group)"),
        (cfg.batch_size % world_size == 0, f"--batch_size {cfg.batch_size} is not divisible by {world_size} ranks"),
        (cfg.max_steps >= 1, "--max_steps must be >= 1"),
        (cfg.micro_batch_size >= 1, "--micro_batch_size must be >= 1"),
        (cfg.max_tokens_per_micro_batch >= 0, "--max_tokens_per_micro_batch must be >= 0 (0: off)"),
        (cfg.rollout_batch_size >= 0, "--rollout_batch_size must be >= 0 (0: all of a rank's rollouts at once)"),
        (cfg.mini_batch_size == 0 or per_rank_trajs % cfg.mini_batch_size == 0,
         f"--mini_batch_size {cfg.mini_batch_size} must divide the {per_rank_trajs} trajectories per rank"),
        ((cfg.mini_batch_size or per_rank_trajs) % cfg.micro_batch_size == 0,
         f"--micro_batch_size {cfg.micro_batch_size} must divide the mini-batch "
         f"({cfg.mini_batch_size or per_rank_trajs} trajectories per rank)"),
        (cfg.loss_agg in ("token_mean", "seq_mean"), f"--loss_agg {cfg.loss_agg!r}: use token_mean or seq_mean"),
        (cfg.thinking in THINKING, f"--thinking {cfg.thinking!r}: use one of {', '.join(THINKING)}"),
        (cfg.clip_ratio_c == 0 or cfg.clip_ratio_c > 1, f"--clip_ratio_c {cfg.clip_ratio_c} must be > 1 (or 0: off)"),
        (cfg.kl_clamp >= 0 and cfg.tis_cap >= 0, "--kl_clamp and --tis_cap must be >= 0 (0: off)"),
        (cfg.temperature > 0, "--temperature must be > 0"),
        (cfg.global_max_pixels == 0 or cfg.global_max_pixels >= floor,
         f"--global_max_pixels must be >= {floor} (one visual token) or 0"),
        (cfg.crop_max_pixels == 0 or cfg.crop_max_pixels >= floor,
         f"--crop_max_pixels must be >= {floor} (one visual token) or 0"),
        (cfg.save_steps >= 0 and cfg.save_total_limit >= 0, "--save_steps and --save_total_limit must be >= 0"),
        (cfg.max_nonfinite_steps >= 1, "--max_nonfinite_steps must be >= 1"),
        (cfg.eval_samples >= 0 and cfg.eval_samples % world_size == 0,
         f"--eval_samples {cfg.eval_samples} must be >= 0 and divisible by {world_size} ranks"),
        (cfg.eval_batch_size >= 1, "--eval_batch_size must be >= 1"),
        (cfg.eval_samples == 0 or cfg.eval_data or cfg.data == "synthetic",
         "--eval_samples needs --eval_data (a benchmark file) when --data is not synthetic"),
        *extra,
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


def recipe_for(name, model):
    """recipes/<name>_<family>_<size>.yaml when `model` is a local checkpoint of the family and shape of
    configs/<family>_<size>.json (so that a plain `--model <7B dir>` runs at the papers' settings); '' for
    anything else (the tiny demo models). E.g. recipe_for("mgpo", "/ckpt/Qwen2.5-VL-7B-Instruct") ->
    "recipes/mgpo_qwen2_5_vl_7b.yaml". A known size without a recipe for `name` stops, naming what to pass. The
    family counts: Qwen2.5-VL-32B and Qwen3.5-27B are both 64 layers of 5,120."""
    if not os.path.isfile(os.path.join(model, "config.json")):
        return ""
    shape = lambda config: (config.model_type, config.text_config.hidden_size,  # noqa: E731
                            config.text_config.num_hidden_layers)
    ours = shape(load_model_config(model))
    for file in sorted(os.listdir(CONFIGS)):
        if shape(load_model_config(os.path.join(CONFIGS, file))) == ours:
            recipe = os.path.join(RECIPES, f"{name}_{file.removesuffix('.json')}.yaml")
            if not os.path.isfile(recipe):
                raise SystemExit(f"error: --model {model!r} has the shape of {file}, and {recipe} does not exist: "
                                 f"pass --config (a recipe file) with the run's settings")
            return recipe
    return ""


@dataclass(frozen=True)
class RolloutConfig:
    """What a rollout reads (rollout.py): pixel budgets resolved, sampling, chunking and turn budgets. Built once
    from a parsed config by `rollout_config`; a variant (greedy, a probe) is `dataclasses.replace(rcfg, ...)`."""
    global_max_pixels: int
    crop_max_pixels: int
    min_pixels: int
    min_box_side: int = 28
    temperature: float = 1.0
    do_sample: bool = True
    probe: str = "none"  # crop-reliance probe of evaluation: 'none', 'gt' or 'noise' (rollout.cut_crop)
    rollout_batch_size: int = 0
    max_new_tokens: int = 0  # the direct (baseline) answer
    max_new_tokens_turn1: int = 0  # MGPO
    max_new_tokens_turn2: int = 0
    max_turns: int = 0  # the tool loop (LFPC)
    max_response_tokens: int = 0
    max_new_tokens_per_turn: int = 0


def rollout_config(cfg, image_processor, **changes):
    """The RolloutConfig of a parsed config `cfg` (a training or eval Config): its fields of the same names, and
    the 0 (= the checkpoint's default) pixel budgets resolved from `image_processor`. Fields that `cfg` does not
    declare keep RolloutConfig's defaults (an MGPO config has no max_turns); `changes` override. E.g. a processor
    with size {"shortest_edge": 3136, "longest_edge": 12845056} and --global_max_pixels 0 --crop_max_pixels 0:
    min_pixels 3136, global_max_pixels 12845056, crop_max_pixels 12845056. A budget under one visual token of
    the model (patch x merge squared: 784 px for Qwen2.5-VL, 1024 for Qwen3-VL) stops, naming the flag."""
    names = {f.name for f in dataclasses.fields(RolloutConfig)}
    own = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    global_max = cfg.global_max_pixels or image_processor.size["longest_edge"]
    rcfg = RolloutConfig(**{**own, "min_pixels": image_processor.size["shortest_edge"],
                            "global_max_pixels": global_max, "crop_max_pixels": cfg.crop_max_pixels or global_max,
                            **changes})
    token = (image_processor.patch_size * image_processor.merge_size) ** 2
    for name in ("global_max_pixels", "crop_max_pixels"):
        if getattr(rcfg, name) < token:
            raise SystemExit(f"error: --{name} {getattr(rcfg, name)} is under one visual token of this model "
                             f"({token} pixels)")
    return rcfg
