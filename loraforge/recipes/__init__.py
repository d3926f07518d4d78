"""Recipes: YAML files declaring merges, stacks, training runs and renders, planned as a DAG and
re-run incrementally by input digest (see `schema.py` for the format, `plan.py` for the CLI contract)."""
