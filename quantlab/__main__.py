"""``python -m quantlab`` runs the command line."""
from .cli import main

main()
