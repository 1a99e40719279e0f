"""mdssd-jax: MDSSD and SSD detectors in JAX/Flax (docs/architecture.md is the map)."""
