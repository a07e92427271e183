"""Command lines and recipe files for a script's config dataclass, through transformers' `HfArgumentParser`.

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

import yaml
from transformers import HfArgumentParser


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
