"""Fine-tuning-step benchmark: tinygpt against PyTorch + transformers on the same weights and batch.

    python -m tinygpt.bench finetune [--only CASES] [--models smollm2,gpt2] [--steps 2]
                                     [--checkpoint-activations auto|on|off] [--no-torch]

Cases (`--only`, comma-separated; default all):
  instruct-lora  one instruction-tuning step, LoRA rank 16 / alpha 16 on every Linear and the
                 head (PyTorch: `peft` if installed, `target_modules` the same Linears)
  instruct-full  the same step training every parameter
  dpo            one DPO step: chosen and rejected through the model as one (2B, T) batch,
                 reference log-probs precomputed (outside the timing), beta 0.1, full model
  classifier     the book's chapter 6 step: last block + final norm + a 2-class head on the
                 last token, batch 8 x 120 random ids, the rest frozen
Models (`--models`): smollm2 = SmolLM2-135M from the GGUF fixture, dequantized to float32;
gpt2 = GPT-2 124M (tied, qkv bias) with tinygpt's seed-0 random weights. Batches: the first 8
entries of instruction-data.json (instruct) or instruction-data-with-preference.json (dpo) in
ChatML, tokenized with SmolLM2's tokenizer (GPT-2 takes the same ids: its vocabulary is larger),
collated as the book (`instruct.collate`, `PreferenceDataset`). AdamW lr 5e-5, decay 0.1.

Each (model, case, engine) runs in its own subprocess. "step s" is the mean of --steps timed
steps after one warm-up step; "peak MB" is the largest resident set while stepping (VmHWM, reset
after loading, so a model load that briefly holds two copies does not count); "process MB" is the
whole process's peak (ru_maxrss), loading included. PyTorch runs 2 threads, eager.
`--checkpoint-activations auto` turns it on for dpo and instruct-lora (where the memory targets
are), off elsewhere.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinygpt.hub.download import shared_data_dir, shared_dir

CASES = ("instruct-lora", "instruct-full", "dpo", "classifier")
MODELS = ("smollm2", "gpt2")
ENGINES = ("tinygpt", "torch")
B, CLS_T, RANK, ALPHA, LR, DECAY, BETA = 8, 120, 16, 16.0, 5e-5, 0.1, 0.1
CHECKPOINT_AUTO = ("dpo", "instruct-lora")


def _gguf() -> Path:
    return shared_dir() / "fixtures" / "smollm2-135m-instruct" / "model.gguf"


def _tokenizer():
    from tinygpt.text.hf_tokenizer import HFTokenizer
    path = shared_dir() / "fixtures" / "smollm2-135m-instruct" / "tokenizer" / "tokenizer.json"
    return HFTokenizer.from_tokenizer_json(path)


def _reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# --- batches: the same arrays for both engines ---------------------------------------------------

def instruct_batch() -> tuple[np.ndarray, np.ndarray]:
    from tinygpt.finetune.instruct import InstructionDataset, read_instruction_data
    entries = read_instruction_data(shared_data_dir() / "instruction-data.json")[:B]
    data = InstructionDataset(entries, _tokenizer(), template="chatml")
    return data.batch(np.arange(B))


def dpo_batch():
    from tinygpt.finetune.dpo import PreferenceDataset, read_preference_data
    entries = read_preference_data(shared_data_dir() / "instruction-data-with-preference.json")
    return PreferenceDataset(entries[:B], _tokenizer(), template="chatml")


def classifier_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 49152, (B, CLS_T)), rng.integers(0, 2, B)


def tinygpt_model(name: str):
    if name == "smollm2":
        from tinygpt.hub.llama import load_gguf
        return load_gguf(_gguf())
    from tinygpt.models.gpt import GPT, GPTConfig
    return GPT(GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True), seed=0)


# --- tinygpt -------------------------------------------------------------------------------------

def run_tinygpt(model_name: str, case: str, steps: int, recompute: bool) -> dict:
    from tinygpt.core import runtime
    from tinygpt.training.train import TrainConfig, make_optimizer, train_step
    runtime.keep_freed_memory()                          # as train() does
    model = tinygpt_model(model_name)
    loss_fn, batch, count = None, None, lambda b: 0
    if case.startswith("instruct"):
        if case == "instruct-lora":
            from tinygpt.finetune.lora import apply_lora
            apply_lora(model, RANK, ALPHA)
        batch = instruct_batch()
    elif case == "dpo":
        from tinygpt.finetune.dpo import DPOObjective
        data = dpo_batch()
        data.set_reference(model, batch_size=B)
        loss_fn, batch = DPOObjective(beta=BETA), data.batch(np.arange(B))
    else:
        from tinygpt.finetune.classify import Classifier, classification_loss, set_trainable
        model = Classifier(model, 2, token_pos="last")
        set_trainable(model, "last-block")
        ids, labels = classifier_batch()
        loss_fn, batch = classification_loss, (ids, np.full(B, CLS_T), labels)
    backbone = getattr(model, "backbone", model)
    backbone.checkpoint_activations = recompute
    opt = make_optimizer(model, TrainConfig(lr=LR, weight_decay=DECAY, batch_size=B))
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}

    def step():
        train_step(model, opt, iter([batch]), grad_clip=0.0, count_tokens=count, **kwargs)
    return _measure(step, steps, model.num_parameters(trainable_only=True))


# --- PyTorch + transformers ----------------------------------------------------------------------

def torch_model(name: str):
    """A transformers model holding tinygpt's weights: LlamaForCausalLM (Linear weights
    transposed to torch's (out, in)) or GPT2LMHeadModel (its Conv1D is (in, out) like ours)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    ours = tinygpt_model(name)
    cfg = ours.config
    if name == "smollm2":
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                               if k not in ("architectures", "torch_dtype")}))
        state = {n: torch.from_numpy(np.ascontiguousarray(p.data.T) if p.ndim == 2 and
                                     "embed" not in n else p.data)
                 for n, p in ours.named_parameters()}
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                           n_head=cfg.n_head, n_positions=cfg.block_size,
                                           vocab_size=cfg.vocab_size, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0))
        state = {"transformer." + n: torch.from_numpy(p.data) for n, p in ours.named_parameters()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        raise RuntimeError(f"torch model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del ours, state
    return model.train()


def _trunk(model):
    return model.model if hasattr(model, "model") else model.transformer


def _torch_lora(model, name: str):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("peft is not installed: pip install peft") from None
    targets = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "lm_head"] if name == "smollm2" else ["c_attn", "c_proj", "c_fc", "lm_head"])
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                     fan_in_fan_out=name == "gpt2")
    return get_peft_model(model, cfg)


def run_torch(model_name: str, case: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(2)
    model = torch_model(model_name)
    if case == "instruct-lora":
        model = _torch_lora(model, model_name)
    if case.startswith("instruct"):
        x, y = (torch.from_numpy(a) for a in instruct_batch())

        def loss_fn():
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    elif case == "dpo":
        data = dpo_batch()
        b = data.collate(np.arange(B))
        ids = torch.from_numpy(np.concatenate([b["chosen"], b["rejected"]]))
        mask = torch.from_numpy(np.concatenate([b["chosen_mask"], b["rejected_mask"]]))
        t0 = int(mask[:, 1:].any(dim=0).int().argmax())
        trunk = _trunk(model)

        def logprobs():
            h = trunk(input_ids=ids).last_hidden_state[:, t0:]
            logits = model.lm_head(h)[:, :-1]
            m = mask[:, t0 + 1:]
            lp = torch.gather(logits.log_softmax(-1), -1, ids[:, t0 + 1:, None])[..., 0]
            return ((lp * m).sum(-1) / m.sum(-1)).view(2, B)
        with torch.no_grad():
            ref = logprobs()

        def loss_fn():
            pi = logprobs()
            return -F.logsigmoid(BETA * ((pi[0] - pi[1]) - (ref[0] - ref[1]))).mean()
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        trunk = _trunk(model)
        layers = trunk.layers if model_name == "smollm2" else trunk.h
        norm = trunk.norm if model_name == "smollm2" else trunk.ln_f
        for p in list(layers[-1].parameters()) + list(norm.parameters()):
            p.requires_grad_(True)
        head = torch.nn.Linear(model.config.hidden_size if model_name == "smollm2"
                               else model.config.n_embd, 2)
        ids, labels = (torch.from_numpy(a) for a in classifier_batch())

        def loss_fn():
            h = trunk(input_ids=ids).last_hidden_state[:, -1]
            return F.cross_entropy(head(h), labels)
        model.head = head
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=DECAY)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _measure(step, steps, sum(p.numel() for p in params))


# --- driver --------------------------------------------------------------------------------------

def _measure(step, steps: int, trainable: int) -> dict:
    _reset_peak()
    step()                                   # warm-up: numba compile/cache load, allocations
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"step_s": (time.perf_counter() - start) / steps, "peak_mb": _peak_mb(),
            "process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": trainable}


def _spawn(engine: str, model: str, case: str, steps: int, recompute: bool) -> dict | None:
    cmd = [sys.executable, "-m", "tinygpt.bench.finetune", "--child", engine, "--models", model,
           "--only", case, "--steps", str(steps),
           "--checkpoint-activations", "on" if recompute else "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  {engine} {model} {case}: failed: {tail}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_list(flag: str, value: str, allowed: tuple) -> list[str]:
    names = [n for n in value.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"{flag}: {','.join(bad) or 'nothing given'} is not one of "
                         f"{', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinygpt bench finetune",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(CASES), help=f"cases: {', '.join(CASES)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"models: {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up (2)")
    parser.add_argument("--checkpoint-activations", choices=("auto", "on", "off"), default="auto",
                        help="tinygpt's activation checkpointing (auto: on for dpo, instruct-lora)")
    parser.add_argument("--no-torch", action="store_true", help="tinygpt only")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 1000:
        print(f"--steps must be between 1 and 1000, got {args.steps}", file=sys.stderr)
        return 2
    try:
        cases = _check_list("--only", args.only, CASES)
        models = _check_list("--models", args.models, MODELS)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if args.child:
        recompute = args.checkpoint_activations == "on"
        out = (run_tinygpt(models[0], cases[0], args.steps, recompute) if args.child == "tinygpt"
               else run_torch(models[0], cases[0], args.steps))
        print(json.dumps(out))
        return 0
    engines = ENGINES if not args.no_torch else ENGINES[:1]
    print(f"fine-tuning steps, batch {B}; {args.steps} timed steps after a warm-up, each engine "
          "in its own process; torch = PyTorch + transformers (+ peft for LoRA), 2 threads")
    print(f"{'model':<9}{'case':<15}{'engine':<13}{'trainable':>12}{'step s':>8}{'peak MB':>9}"
          f"{'process MB':>12}{'speed vs torch':>16}")
    for model in models:
        for case in cases:
            recompute = (case in CHECKPOINT_AUTO if args.checkpoint_activations == "auto"
                         else args.checkpoint_activations == "on")
            results = {e: _spawn(e, model, case, args.steps, recompute) for e in engines}
            theirs = results.get("torch")
            for engine, r in results.items():
                if r is None:
                    continue
                label = engine + (" +ckpt" if engine == "tinygpt" and recompute else "")
                ratio = (f"{theirs['step_s'] / r['step_s']:.2f}x"
                         if engine == "tinygpt" and theirs else "")
                print(f"{model:<9}{case:<15}{label:<13}{r['trainable']:>12,}{r['step_s']:>8.2f}"
                      f"{r['peak_mb']:>9,.0f}{r['process_mb']:>12,.0f}{ratio:>16}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
