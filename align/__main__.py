"""`python -m align ...` and `accelerate launch -m align run recipe.yaml`."""

from align.cli import main

main()
