"""MLLMU-Bench evaluation: protocol prompts, metrics with bootstrap CIs, the evaluator and the report."""
