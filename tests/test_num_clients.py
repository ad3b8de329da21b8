"""num-clients = 0: K is every SuperNode connected once their count stops changing (not the first to register)."""

import pytest

from fl_ietagc.settings.config import ConfigError, parse_config


class RegisteringGrid:
    """SuperNodes that register one per `every` polls, up to `total`."""

    def __init__(self, total: int, every: int):
        self.total, self.every, self.polls = total, every, 0

    def get_node_ids(self):
        self.polls += 1
        return list(range(min(self.total, self.polls // self.every)))


def test_k_is_the_settled_count_not_the_first_node():
    from strategies.server_app import resolve_num_clients

    grid = RegisteringGrid(total=3, every=3)  # node 1 at poll 3, node 2 at poll 6, node 3 at poll 9
    k = resolve_num_clients(parse_config({"num-clients": 0}), grid, settle_s=0.05, poll_s=0.01)
    assert k == 3


def test_num_clients_set_is_taken_without_polling():
    from strategies.server_app import resolve_num_clients

    grid = RegisteringGrid(total=3, every=1)
    assert resolve_num_clients(parse_config({"num-clients": 5}), grid) == 5
    assert grid.polls == 0


def test_no_supernode_is_a_named_error(monkeypatch):
    import strategies.server_app as sa

    monkeypatch.setattr(sa, "NODE_WAIT_S", 0.05)
    with pytest.raises(ConfigError, match="num-clients = 0: no SuperNode connected"):
        sa.resolve_num_clients(parse_config({"num-clients": 0}), RegisteringGrid(0, 1), settle_s=0.01, poll_s=0.01)


def test_flower_simulation_passes_k_as_num_clients(tmp_path):
    """flower-simulation knows K: the run config it starts carries it, so the ServerApp never counts nodes."""
    from experiments.launch.simulate import parse_args, prepare

    app = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    args = parse_args(
        [
            "--app",
            app,
            "--num-supernodes",
            "2",
            "--run-config",
            f"output-dir='{tmp_path}' max-images=64 preset='tiny' batch-size=8",
        ]
    )
    run_config = prepare(args)[3]
    assert run_config["num-clients"] == 2
