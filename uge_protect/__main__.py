"""``python -m uge_protect`` (also what ``accelerate launch -m uge_protect`` runs)."""

from uge_protect.cli.entry import main

main()
