"""The README against the code: every `file.py:function` it names is defined there, its quick-start commands are
the two a new user runs, each algorithmic step names its function, and every link it makes to a file exists.

The code is parsed (ast), not imported: a name resolves when the file defines it at top level (a function or a
class; `Class.method` also looks inside the class body)."""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# `rollout.py:tool_rollout`, `demo/synthetic.py:synthetic_samples`, `family.py:Family.to_original`
REFERENCE = re.compile(r"((?:[\w-]+/)*\w+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown [text](target)
DOCS_PATH = re.compile(r"\bdocs/[\w./-]*\w")

# The acceptance of the README: a new user runs exactly these two lines (issue: "the README's two commands work in a
# fresh clone"), so a reworded quick start is a failure, not a style change.
QUICK_START = [
    "python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -r requirements.txt "
    "&& python train_mgpo.py",
    "python -m pytest -q",
]
# Each algorithmic step the README must name with its file and function: the words its numbered step starts with.
STEPS = ["Box parse", "Coordinate map", "Crop", "Loss mask", "Advantage", "Clipped loss", "KL", "Info gap",
         "Grounding reward", "Tool loop", "Stage-1 reward", "Turn 2 continues from turn 1's KV cache"]


def references():
    return sorted(set(REFERENCE.findall(README)))


@cache
def top_level(path):
    """{name: node} of the functions and classes a file defines at top level."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=str(path))
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def resolve(path, dotted):
    """None when `path` defines `dotted`, else why not."""
    if not (ROOT / path).is_file():
        return f"{path} does not exist"
    first, *rest = dotted.split(".")
    node = top_level(path).get(first)
    if node is None:
        return f"{path} defines no top-level function or class {first}"
    for name in rest:
        inner = {n.name: n for n in getattr(node, "body", [])
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        if name not in inner:
            return f"{path}: {node.name} has no {name}"
        node = inner[name]
    return None


def numbered_steps(text):
    """The README's numbered list items, each with its indented continuation lines joined: ['Box parse: ...', ...]."""
    steps, open_item = [], False
    for line in text.splitlines():
        item = re.match(r"^\d+\.\s+(.*)", line)
        if item:
            steps.append(item.group(1))
        elif open_item and line.startswith("   ") and line.strip():
            steps[-1] += " " + line.strip()
        open_item = bool(item) or (open_item and line.startswith("   ") and bool(line.strip()))
    return steps


def test_the_readme_names_functions():
    # a regex that matched nothing would make the next test pass on any README
    assert len(references()) >= 30, references()


@pytest.mark.parametrize("path,name", references(), ids=[f"{p}:{n}" for p, n in references()])
def test_every_named_function_is_defined(path, name):
    why = resolve(path, name)
    assert why is None, f"README names `{path}:{name}`, but {why}"


def test_resolve_finds_what_is_there_and_only_that():
    # the checker itself, on names whose presence is known: this file's own functions
    here = "tests/test_readme.py"
    assert resolve(here, "resolve") is None
    assert resolve(here, "numbered_steps") is None
    assert resolve(here, "REFERENCE") is not None  # a constant, not a function or class
    assert resolve(here, "no_such_function") is not None
    assert resolve("no_such_file.py", "f") == "no_such_file.py does not exist"


@pytest.mark.parametrize("command", QUICK_START)
def test_quick_start_commands_are_verbatim(command):
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert command in quick_start.splitlines(), f"the quick start lacks the line: {command}"


@pytest.mark.parametrize("step", STEPS)
def test_each_algorithmic_step_names_its_function(step):
    found = [s for s in numbered_steps(README) if s.startswith(step)]
    assert found, f"no numbered step of the README starts with {step!r}"
    assert any(REFERENCE.search(s) for s in found), f"the step {step!r} names no file.py:function: {found}"


def test_every_linked_file_exists():
    targets = {t for t in LINK.findall(README) if "://" not in t} | set(DOCS_PATH.findall(README))
    assert any(t.startswith("docs/") for t in targets), "the README links none of docs/"
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, f"the README links files that do not exist: {missing}"
