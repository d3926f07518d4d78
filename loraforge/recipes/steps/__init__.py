"""The built-in recipe step kinds, one module each (see `loraforge.recipes.step_kind.StepKind`).

Every module here registers its kind in `loraforge.plugins.STEP_KINDS` when the group loads them.
"""
