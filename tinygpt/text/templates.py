"""Prompt templates: the one definition of how an instruction becomes text, for training,
generation, chat and the judge alike.

`alpaca` is the book's (chapter 7, byte for byte), `phi3` its exercise 7.1, and `chatml` the
format of chat models such as SmolLM2 (`<|im_start|>role\\n...<|im_end|>`). An entry is a dict
with `instruction`, optional `input`, and (for training) `output`:

    format_input(entry)                the instruction part, as the judge's {prompt}
    format_input(entry) + header       what the model continues from at generation
    format_example(entry)              header and output appended: one training text

    python -c "from tinygpt.text.templates import *; print(format_example({'instruction': 'Say hi', 'output': 'hi'}))"
"""
from __future__ import annotations

from dataclasses import dataclass

from tinygpt.text.hf_tokenizer import SMOLLM2_SYSTEM_PROMPT, apply_chat_template

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
SMOLLM_SYSTEM = SMOLLM2_SYSTEM_PROMPT


@dataclass(frozen=True)
class Template:
    name: str
    header: str                    # between the instruction part and the response
    end_token: str                 # the special token that ends a response (collate appends it)


TEMPLATES = {
    "alpaca": Template("alpaca", "\n\n### Response:\n", "<|endoftext|>"),
    "phi3": Template("phi3", "\n<|assistant|>:\n", "<|endoftext|>"),
    "chatml": Template("chatml", "<|im_start|>assistant\n", "<|im_end|>"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def chatml(messages: list[dict], add_generation_prompt: bool = True,
           default_system: str = SMOLLM_SYSTEM) -> str:
    """ChatML as SmolLM2's chat template renders it: a default system turn when the first
    message is not a system message, then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
    message, and `<|im_start|>assistant\\n` to ask for a reply."""
    turns = [] if messages and messages[0].get("role") == "system" else \
        [{"role": "system", "content": default_system}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in turns + list(messages))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _check(entry: dict, need_output: bool) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"an entry must be a JSON object, got {type(entry).__name__}")
    for key in ("instruction", "output") if need_output else ("instruction",):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"entry has no {key!r} text (keys: {', '.join(map(str, entry))})")
    if not isinstance(entry.get("input", ""), str):
        raise ValueError("entry's 'input' is not text")


def format_input(entry: dict, template: str = "alpaca") -> str:
    """The instruction (and input, when non-empty) in the template, without the response part."""
    _check(entry, need_output=False)
    t = get_template(template)
    instruction, extra = entry["instruction"], entry.get("input") or ""
    if t.name == "alpaca":
        return (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
                + (f"\n\n### Input:\n{extra}" if extra else ""))
    if t.name == "phi3":
        return f"<|user|>\n{instruction}" + (f"\n{extra}" if extra else "")
    content = instruction + (f"\n\n{extra}" if extra else "")
    return chatml([{"role": "user", "content": content}], add_generation_prompt=False)


def format_prompt(entry: dict, template: str = "alpaca") -> str:
    """What the model continues from: the instruction part and the response header."""
    return format_input(entry, template) + get_template(template).header


def format_example(entry: dict, template: str = "alpaca") -> str:
    """One training text: prompt and the entry's output (the end token is added by the collate)."""
    _check(entry, need_output=True)
    return format_prompt(entry, template) + entry["output"]


def extract_response(text: str, entry: dict, template: str = "alpaca") -> str:
    """The model's response from a generated text that starts with the prompt: the prompt and
    the header removed, the end token and surrounding white space stripped (as the book)."""
    prompt = format_prompt(entry, template)
    response = text[len(prompt):] if text.startswith(prompt) else text
    t = get_template(template)
    response = response.split(t.end_token)[0]
    return response.replace("### Response:", "").strip()
