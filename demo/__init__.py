"""The CPU demo: the tiny offline Qwen2.5-VL (tiny.py), the synthetic high-resolution task (synthetic.py), the
builders of the committed base models (make_base.py, make_tool_base.py) and the bases themselves (checkpoints/).

Run the builders from the repository root as modules: `python -m demo.make_base`, `python -m demo.make_tool_base`.
"""
