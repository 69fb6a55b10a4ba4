"""Training: tokenizer training, trainer loop, schedules, checkpoint/resume, SFT for chat.

    config.py       TrainConfig (TOML + flags)      schedule.py   warmup + cosine lr
    data.py         rows, order, rank slices        sft.py        chat JSONL -> masked rows
    parallelize.py  torchrun, DDP, FSDP2            run_checkpoint.py  atomic checkpoints, resume
    metrics.py      MFU, metrics.jsonl, plot        trainer.py    the loop: train(cfg)
    cli.py          `codegemma train`               tokenizer_trainer.py  byte-fallback BPE training

    codegemma train --config run.toml
    torchrun --standalone --nproc-per-node 8 -m codegemma.train --config run.toml --parallel fsdp

Guide: docs/training.md.
"""
