"""The shard list and the connections under it: RESP, Sentinel and Cluster routing, health."""
