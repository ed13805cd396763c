"""Stage 3, fine-tuning: adapters that hand `train()` a dataset, a model wrapper and a loss.

`templates.py` (prompt formats shared by training, generation, chat and the judge), `classify.py`
(chapter 6: a spam classifier), `instruct.py` (chapter 7: instruction tuning), `lora.py`
(appendix E), `dpo.py` (chapter 7's preference-tuning bonus). None has a training loop of its
own: each is a dataset with `__len__`/`batch`, a loss function and metrics for `tinygpt.training.train`.
"""
