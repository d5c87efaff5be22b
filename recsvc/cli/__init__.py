"""The ``recsvc`` command and the offline tools it runs: seed, train, simulate."""
