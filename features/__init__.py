"""Pure feature code shared by serving and training: no I/O libraries, no recsvc."""
