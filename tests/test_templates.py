"""Prompt templates: the book's Alpaca format byte for byte, phi-3, and SmolLM2's ChatML."""
import json

import pytest

from tinygpt.text.templates import (chatml, extract_response, format_example, format_input,
                                        format_prompt, get_template)

ENTRY = {"instruction": "Rewrite the sentence using a simile.",
         "input": "The car is very fast.", "output": "The car is as fast as lightning."}


def test_alpaca_is_the_books_format_byte_for_byte():
    assert format_example(ENTRY) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast.\n\n### Response:\nThe car is as fast as lightning.")
    no_input = {**ENTRY, "input": ""}
    assert "### Input" not in format_input(no_input)
    assert format_prompt(no_input).endswith("simile.\n\n### Response:\n")


def test_phi3_template():
    assert format_example(ENTRY, "phi3") == ("<|user|>\nRewrite the sentence using a simile.\n"
                                             "The car is very fast.\n<|assistant|>:\n"
                                             "The car is as fast as lightning.")


def test_chatml_equals_smollm2s_rendering(shared):
    meta = json.loads((shared / "fixtures" / "smollm2-135m-instruct" / "meta.json").read_text())
    question = meta["chat0"]["question"]
    assert chatml([{"role": "user", "content": question}]) == meta["chat0"]["prompt_text"]
    assert format_prompt({"instruction": question}, "chatml") == meta["chat0"]["prompt_text"]
    with_system = chatml([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"}])
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "SmolLM" not in with_system


@pytest.mark.parametrize("template", ["alpaca", "phi3", "chatml"])
def test_extract_response_strips_prompt_header_and_end(template):
    text = format_prompt(ENTRY, template) + "  Fast as light. " + \
        get_template(template).end_token + "junk"
    assert extract_response(text, ENTRY, template) == "Fast as light."


def test_bad_entries_and_names_are_clear():
    with pytest.raises(ValueError, match="no 'output'"):
        format_example({"instruction": "x"})
    with pytest.raises(ValueError, match="no 'instruction'"):
        format_input({"input": "x"})
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        format_input(ENTRY, "nope")
