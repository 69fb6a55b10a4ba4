"""Learning-rate schedule: linear warmup then cosine decay, a pure function of the step.

Being a function of the step alone, the schedule needs no state in a checkpoint: a resumed run
computes the same lr for the same step. Step s (0-based) is the (s+1)-th optimizer update:

    warmup   s < W:      lr = peak * (s + 1) / W           (the first update already moves)
    cosine   W <= s:     lr = min + (peak - min) * (1 + cos(pi * p)) / 2,
                         p = (s - W) / (total - W) clipped to [0, 1],  min = peak * min_lr_ratio

    lr_at(0, peak_lr=3e-4, warmup_steps=100, total_steps=1000, min_lr_ratio=0.1)  # 3e-6
"""

from __future__ import annotations

import math


def lr_at(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = peak_lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
