"""Models: the registry (load, verify, roll back) and compiled scoring."""
