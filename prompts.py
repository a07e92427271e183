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
# renders `tools`), with the box described in the family's frame.
def zoom_tool(bbox_description):
    return {"type": "function", "function": {
        "name": TOOL_NAME,
        "description": "Zoom in on a region of the image: the region is cut from the full-resolution original and "
                       "returned as a new image.",
        "parameters": {"type": "object", "required": ["bbox_2d"], "properties": {
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                        "description": bbox_description},
            "label": {"type": "string", "description": "The name of the object in the region."}}}}}


def tool_system(tool):
    """DeepEyes' system prompt around the tool schema `tool`."""
    return ("You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
            "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            + json.dumps(tool) + "\n</tools>\n\nFor each function call, return a json object with function name "
            "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}\n</tool_call>")


ZOOM_TOOL = zoom_tool("The region as [x1, y1, x2, y2] in pixels of the image as you see it.")


@dataclass(frozen=True)
class ToolPrompts:
    """Every string of the tool-calling template (DeepEyes' wording), in one place."""
    system: str = tool_system(ZOOM_TOOL)
    user: str = ("{question} {choices}\nThink first, call image_zoom_in_tool if needed, then answer. Format "
                 "strictly as: <think>...</think> <tool_call>...</tool_call> (if tools needed) <answer>...</answer>")
    crop_before: str = "<tool_response>\n"
    crop_after: str = "\n</tool_response>"
    error: str = ("<tool_response>\nError: {error}. Call image_zoom_in_tool with bbox_2d [x1, y1, x2, y2] inside the "
                  "image, at least 28 pixels wide and high, or give your answer.\n</tool_response>")


TOOL_PROMPTS = ToolPrompts()

# The relative frame (Qwen3-VL, Qwen3.5): boxes in 0..1000 of the image's width and height, Qwen3-VL's grounding
# convention. Only the strings that state the box's frame differ from the absolute ones above.
RELATIVE_MGPO_PROMPTS = MGPOPrompts(
    turn1="{question} Output the coordinates of the key image area relevant to the problem in JSON format, as "
          "[x1, y1, x2, y2] from 0 to 1000 relative to the image's width and height.")
ZOOM_TOOL_RELATIVE = zoom_tool("The region as [x1, y1, x2, y2] from 0 to 1000 relative to the image's width and "
                               "height, whatever its size.")


def relative_tool_prompts(min_side):
    return ToolPrompts(
        system=tool_system(ZOOM_TOOL_RELATIVE),
        error="<tool_response>\nError: {error}. Call image_zoom_in_tool with bbox_2d [x1, y1, x2, y2] from 0 to 1000 "
              f"relative to the image, covering at least {min_side} pixels of it wide and high, or give your "
              "answer.\n</tool_response>")


@dataclass(frozen=True)
class FamilyPrompts:
    mgpo: MGPOPrompts
    tool: ToolPrompts


def prompts_for(family):
    """The recipes' prompts in the frame of `family` (a family.Family) writes its boxes in: Qwen2.5-VL's are
    MGPO_PROMPTS and TOOL_PROMPTS; a relative family's ask for 0..1000 coordinates, and the tool error names the
    family's patch grid (32 px for Qwen3-VL) as the smallest side. E.g.
    `mgpo_rollout(..., prompts=prompts_for(family_of(model.config)).mgpo)`."""
    if family.frame == "absolute":
        return FamilyPrompts(MGPO_PROMPTS, TOOL_PROMPTS)
    if family.frame == "relative":
        return FamilyPrompts(RELATIVE_MGPO_PROMPTS, relative_tool_prompts(family.factor))
    raise ValueError(f"family {family.name}: frame {family.frame!r} has no prompts (use 'absolute' or 'relative')")

# One turn, no tool: the baseline prompt, and how offline resolution selection asks for the policy's answer.
DIRECT_SYSTEM = "You are a helpful assistant."
DIRECT_PROMPT = "{question} {choices}\nAnswer with the option's letter from the given choices directly."
