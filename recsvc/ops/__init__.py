"""Process plumbing used by every layer: metrics, JSON logs, event-loop lag,
the embedded redis-server."""
