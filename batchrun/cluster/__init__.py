"""Engine replicas on Ray: the shard queue (queue.py), one replica (actor.py), and the
replicas' driver (replicas.py)."""
