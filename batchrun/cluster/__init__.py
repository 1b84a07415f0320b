"""Engine replicas on Ray: the shard queue (queue.py) and the replicas and their driver
(replicas.py)."""
