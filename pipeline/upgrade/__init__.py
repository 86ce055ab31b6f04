"""The per-shard upgrade: facts, plan, price, simulate, execute, validate around ShardWork."""
