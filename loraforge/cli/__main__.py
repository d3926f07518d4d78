"""`python -m loraforge` runs the CLI."""

from loraforge.cli import main

main()
