"""Every prompt string of the recipes, in one place: a fork changes them here and nowhere else.

The tiny tokenizer's corpus (tiny.py) and the committed demo bases were built from these exact strings: change a
character and they no longer match."""

import json
from dataclasses import dataclass

from crop import TOOL_NAME


@dataclass(frozen=True)
class MGPOPrompts:
    """Every string of the MGPO template, in one place so that a fork changes them here and nowhere else."""
    system: str = (
        "You are a helpful assistant. Given an image and one question. First, identify the coordinates of the key "
        "image area relevant to solving the problem. Append the coordinates in JSON format at the end of your "
        "response and stop. This will trigger cropping of the corresponding area in the original image and enlarge "
        "it for improved clarity. Once the enlarged image is available, provide the final answer (A, B, C, D, or E) "
        "enclosed within \\boxed{}.")
    turn1: str = "{question} Output the coordinates of the key image area relevant to the problem in JSON format."
    crop_intro: str = "Based on the provided coordinates, return the sub-image:"
    invalid_intro: str = "Not providing correct coordinates or invalid coordinate values, return the original image:"
    turn2: str = ("Question: {question} {choices}\nAnalyse the original image and the sub-image together, then "
                  "put the final answer (the option letter) within \\boxed{{}}.")


MGPO_PROMPTS = MGPOPrompts()

# The cropping tool in Qwen's function-calling style (the schema goes into the system prompt, as Qwen's template
# renders `tools`).
ZOOM_TOOL = {"type": "function", "function": {
    "name": TOOL_NAME,
    "description": "Zoom in on a region of the image: the region is cut from the full-resolution original and "
                   "returned as a new image.",
    "parameters": {"type": "object", "required": ["bbox_2d"], "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "The region as [x1, y1, x2, y2] in pixels of the image as you see it."},
        "label": {"type": "string", "description": "The name of the object in the region."}}}}}


@dataclass(frozen=True)
class ToolPrompts:
    """Every string of the tool-calling template (DeepEyes' wording), in one place."""
    system: str = (
        "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(ZOOM_TOOL) + "\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call>")
    user: str = ("{question} {choices}\nThink first, call image_zoom_in_tool if needed, then answer. Format "
                 "strictly as: <think>...</think> <tool_call>...</tool_call> (if tools needed) <answer>...</answer>")
    crop_before: str = "<tool_response>\n"
    crop_after: str = "\n</tool_response>"
    error: str = ("<tool_response>\nError: {error}. Call image_zoom_in_tool with bbox_2d [x1, y1, x2, y2] inside the "
                  "image, at least 28 pixels wide and high, or give your answer.\n</tool_response>")


TOOL_PROMPTS = ToolPrompts()

# One turn, no tool: the baseline prompt, and how offline resolution selection asks for the policy's answer.
DIRECT_SYSTEM = "You are a helpful assistant."
DIRECT_PROMPT = "{question} {choices}\nAnswer with the option's letter from the given choices directly."
