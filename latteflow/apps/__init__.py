"""Applications: the ``latteflow`` command line, the digits recipe, experiments, bench (the top floor)."""
