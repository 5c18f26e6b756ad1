"""Training recipes, one per stage, each readable top to bottom (shared pieces: model/training.py).

- pretrain: the tiny preset's stand-in for a pretrained base (everything trains);
- align: stage 1, the MLP projector alone on captions;
- tune: stage 2, LoRA (or the full LLM) on the instruction mix under DeepSpeed ZeRO-3, on every
  rank under torchrun or Slurm (`python -m model.recipes.tune`).
"""
