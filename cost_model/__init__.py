"""The cost model: FLOPs, communication, time and memory on a modeled cluster."""
