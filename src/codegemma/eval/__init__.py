"""Evaluation: HumanEval, HumanEval infilling and MBPP, scored by execution in a real sandbox.

tasks/ (task sets, with their defaults), sandbox.py + _driver.py (isolation, and the checker
process that alone decides a verdict), execution.py (program + typed outcome),
passk.py (unbiased pass@k), runner.py (generate, execute, resume), report.py (table beside the
published numbers), cli.py (`codegemma eval run|score|report|export`). Guide: docs/eval.md.
"""
