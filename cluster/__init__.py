"""The top of the stack: the `personalize` command, and the local cluster's scripts (cluster/local)."""
