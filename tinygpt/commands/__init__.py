"""Subcommands that live beside `cli.py`: each module's `add_parsers(subparsers)` adds its
commands, each with `set_defaults(run=fn)` where `fn(args) -> int` is the exit status. User
errors are raised as ValueError (one line, exit 2, printed by the caller)."""

from pathlib import Path

# what save_finetuned can leave in --out: a GPT-2 or Llama hub folder with its tokenizer, or LoRA
# adapters (weights.py, tokenizer.py, hf_tokenizer.py, finetune/lora.py name them)
MODEL_FILES = ("model.safetensors", "config.json", "tinygpt-tokenizer.json", "tokenizer.json",
               "tokenizer_config.json", "lora.safetensors", "lora.json")


def check_out(out: str | Path, *own: str) -> None:
    """Before any work: refuse an --out folder holding a file a fine-tuning command would write
    (the training loop's, the model's, and `own`: the command's own results), so a user's files
    there are never overwritten; other files in it are left alone."""
    from tinygpt.training.checkpoint import RUN_FILES, check_new_run_dir
    check_new_run_dir(out, (*RUN_FILES, *MODEL_FILES, *own))


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
