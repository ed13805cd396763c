"""Pretraining: AdamW and the schedule (`optim`), the one `train()` loop (`train`), a run's
checkpoints and pictures (`checkpoint`), and data parallelism over MPI (`distributed`)."""
