"""Evaluators: score generated images against their prompts; every module here registers its
evaluators in the EVALUATORS plugin group."""
