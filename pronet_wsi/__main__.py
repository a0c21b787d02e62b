"""``python -m pronet_wsi`` runs the command line."""

from pronet_wsi.cli import main

main()
