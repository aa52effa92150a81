"""``python -m abd_plugin`` runs the evaluation kit's command line (``abd-plugin``)."""
from abd_plugin.kit.cli import main

raise SystemExit(main())
