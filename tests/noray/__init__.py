"""The guard of ``make test-fast``: see ``sitecustomize``."""
