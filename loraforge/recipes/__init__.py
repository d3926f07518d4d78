"""Recipes: YAML files declaring merges, stacks, training runs and renders, planned as a DAG and
re-run incrementally by input digest (see `schema.py` for the format, `step_kind.py` for what a step
kind is, `steps/` for the built-in kinds, `plan.py` for the CLI contract)."""
