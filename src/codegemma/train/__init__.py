"""Training: tokenizer training, trainer loop, schedules, checkpoint/resume, SFT for chat."""
