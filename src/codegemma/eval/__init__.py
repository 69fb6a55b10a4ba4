"""Evaluation: HumanEval, HumanEval infilling and MBPP, scored by execution in a real sandbox.

tasks/ (task sets), sandbox.py (process isolation), execution.py (program + verdict),
passk.py (unbiased pass@k), runner.py (generate, execute, resume), report.py (table beside the
published numbers), cli.py (`codegemma eval run|score|report|export`). Guide: docs/eval.md.
"""
