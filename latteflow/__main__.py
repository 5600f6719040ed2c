"""``python -m latteflow ...`` runs the ``latteflow`` command line."""
import sys

from latteflow.apps.cli import main

sys.exit(main())
