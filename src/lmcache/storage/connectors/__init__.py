"""Remote connectors (options: valkey, valkey_cluster, fs, lm, blackhole) and the wire format."""
