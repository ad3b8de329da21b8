"""The backend config of the tests' own simulations: every client in one Ray actor.

Each Ray actor imports torch and diffusers before it trains (~10 CPU-s on this project's machine), and the suite is
CPU-bound: both cores were busy for its whole run (measured 2026-12-08 from /proc/stat, Ray's actors, which Ray runs
at nice 15, a quarter of it). A second actor for a test's tiny rounds only adds that import. What the actors and
nodes themselves do is tested with their own configs (test_ray_cluster.py, test_backend_failures.py)."""

import json

# (a private Ray of one CPU, not num_cpus = this machine's count: Ray counts CPUs its own way, cgroup quotas
# included, and a client asking for more than Ray has would leave no actor at all)
ONE_ACTOR = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 1}}
ONE_ACTOR_JSON = json.dumps(ONE_ACTOR)
