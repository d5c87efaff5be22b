"""Redis: connections and cluster topology, the circuit breaker, script
pipelining, the storage codec, key names, the feature store and item snapshots."""
