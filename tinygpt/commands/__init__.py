"""Subcommands that live beside `cli.py`: each module's `add_parsers(subparsers)` adds its
commands, each with `set_defaults(run=fn)` where `fn(args) -> int` is the exit status. User
errors are raised as ValueError (one line, exit 2, printed by the caller)."""

from pathlib import Path


def save_finetuned(model, out: str | Path, tokenizer, lora_rank: int, base_name: str,
                   **adapter) -> str:
    """What a fine-tuning command leaves in --out: only the LoRA adapters when it trained some
    (`lora.save_adapter`), else the whole model with its tokenizer (`weights.save_pretrained`,
    GPT-2 or Llama layout). Returns a line for the user."""
    if lora_rank:
        from tinygpt.finetune.lora import save_adapter
        save_adapter(model, Path(out), base_name=base_name, **adapter)
        return f"LoRA adapters saved in {out}"
    from tinygpt.hub.pretrained import save_pretrained
    save_pretrained(model, out, tokenizer=tokenizer)
    return f"model saved in {out}"
