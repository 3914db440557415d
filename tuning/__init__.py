"""Ray Tune sweeps over dotted config paths."""
