"""The project's benchmark scripts (a regular package, so that `benchmarks.device_args` is this folder's even where
another installed distribution ships a top-level `benchmarks` package, as opacus 1.6 does)."""
