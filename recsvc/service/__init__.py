"""What the service does, free of HTTP: recommendations and their fallbacks,
event ingestion, online feature reads, the in-process item cache, admission."""
