"""The Flower ServerApp: validate, start or resume a run, train R rounds, write the run directory.

Order of work: parse and validate the run config (and the data it names) before anything is trained;
create the run directory (or reopen the one `resume-from` names, rolled back to its last committed
round, with a config that must equal the one it was started with); initial weights (fresh from the
seed, or `init-checkpoint`); then the rounds, each committed atomically through `RunDir.commit_round`
(metrics, skip counts, checkpoint, and the resume point: global raw + EMA weights, the strategy's own
state, numpy's RNG, RET shards, skip totals and which round's state each client starts from); at the
end, `final.pt` and a grid of samples.

The rounds are this module's own loop over the strategy's `configure_train` / `aggregate_train`
(Flower's `Strategy.start` always begins at round 1 and cannot resume): true round numbers reach the
clients (their seeds) and the strategy (FedAdam's bias correction). Each round the ServerApp hands the strategy
its instruction as configure_train's `config` and gets the sorted replies back from `aggregate_round` (base.py).
The run lives inside `run_lifecycle` (fl_ietagc/runs/lifecycle.py): a failure is written to
`status.json` as one line (client tracebacks go to `logs/client-p<P>-r<R>.log`, the server's to
`logs/failure.log`) and re-raised, so the run fails visibly.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_ietagc.data.datasets import image_size, load_splits
from fl_ietagc.data.shards import shards_for_config
from fl_ietagc.evaluation.images import write_sample_grid
from fl_ietagc.federation import protocol as P
from fl_ietagc.federation.protocol import ClientFailure
from fl_ietagc.federation.wire import Layout, flatten, unflatten, wire_bytes
from fl_ietagc.runs import phases
from fl_ietagc.runs.checkpoints import pack_weights, unpack_weights
from fl_ietagc.runs.faults import fault_point
from fl_ietagc.runs.lifecycle import round_record, run_lifecycle
from fl_ietagc.runs.round_commits import CommitError, RoundCommits
from fl_ietagc.runs.rundir import WRITE_TIMEOUT_S, RunDir
from fl_ietagc.settings.config import ConfigError, RunConfig, parse_config
from fl_ietagc.training import ret
from fl_ietagc.training.models import load_weights
from fl_ietagc.training.privacy import rdp_accountant, round_privacy
from fl_ietagc.training.run_model import build_for_config, initial_weights
from fl_ietagc.training.trainer import pick_device
from fl_ietagc.validate import check_device, check_model, check_run_dir, check_secure_aggregation

from .base import ClientRoundError, RoundReplies, as_record, numpy_arrays
from .registry import build_strategy
from .secure_aggregation import secure_round
from .state import export_state, import_state

NODE_WAIT_S = 120  # num-clients = 0: how long to wait for the first SuperNode
NODE_SETTLE_S = 5.0  # ... and for the count of connected SuperNodes to stop changing
REPLY_POLL_S = 0.1  # how often a round asks for its replies (Flower's Grid.send_and_receive: every 3 s)

app = ServerApp()


@dataclass
class ServerState:
    """Everything on the server side that the next round depends on (saved in resume.pt)."""

    token: str
    shards: list[np.ndarray]
    state_rounds: list[int]  # per partition: the round whose client state it starts the next round from
    skip_totals: np.ndarray  # per training image, over the run
    skip_period: np.ndarray  # per training image, since the last RET redistribution
    ret_events: int = 0

    def to_saved(self, strategy) -> dict:
        """A snapshot (copies: the next round changes these arrays while this one is written on a thread)."""
        return {
            "token": self.token,
            "shards": [torch.from_numpy(s.copy()) for s in self.shards],
            "state-rounds": list(self.state_rounds),
            "skip-totals": torch.from_numpy(self.skip_totals.copy()),
            "skip-period": torch.from_numpy(self.skip_period.copy()),
            "ret-events": self.ret_events,
            "strategy": export_state(strategy),
        }

    @classmethod
    def from_saved(cls, saved: dict) -> ServerState:
        return cls(
            token=saved["token"],
            shards=[s.numpy() for s in saved["shards"]],
            state_rounds=list(saved["state-rounds"]),
            skip_totals=saved["skip-totals"].numpy().copy(),
            skip_period=saved["skip-period"].numpy().copy(),
            ret_events=int(saved["ret-events"]),
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    check_model(cfg)
    check_device(cfg)
    check_run_dir(cfg)
    if cfg.resume_from:
        run, num_clients, start_round, net, ema, saved = reopen_run(cfg)
    else:
        num_clients = resolve_num_clients(cfg, grid)
        shards = shards_for_config(cfg, num_clients)  # validates the data against K and batch-size
        net, ema = initial_weights(cfg)  # validates init-checkpoint
        run = RunDir.create(cfg.output_dir, cfg.run_name, f"{cfg.dataset}-{cfg.preset}-k{num_clients}")
        start_round, saved = 0, None
    log(INFO, "fl-ietagc: run directory %s%s", run.path, f" (resumed after round {start_round})" if saved else "")
    with run_lifecycle(run, start_round, cfg.num_server_rounds, on_failure=log_failure, mark_on_signals=True):
        if saved is None:
            saved = begin_run(cfg, run, num_clients, shards, net, ema)
        run_federated(grid, cfg, run, num_clients, start_round, net, ema, saved)


def log_failure(run: RunDir) -> None:
    log(
        ERROR,
        "fl-ietagc: run failed: %s | status, tracebacks: %s, %s",
        run.read_status()["error"],
        run.status_path,
        run.logs_dir,
    )


def resolve_num_clients(cfg: RunConfig, grid: Grid, settle_s: float = NODE_SETTLE_S, poll_s: float = 0.5) -> int:
    """K: num-clients when set, else every SuperNode connected once their count has not changed for `settle_s`
    (SuperNodes register one by one: taking the count at the first node would start a run with too few)."""
    if cfg.num_clients:
        return cfg.num_clients
    deadline = time.time() + NODE_WAIT_S
    count, since = 0, time.time()
    while True:
        now_count = len(list(grid.get_node_ids()))
        if now_count != count:
            count, since = now_count, time.time()
        elif count and time.time() - since >= settle_s:
            log(INFO, "fl-ietagc: num-clients = 0: %d SuperNode(s) connected, running with K = %d", count, count)
            return count
        if not count and time.time() > deadline:
            raise ConfigError(
                f"num-clients = 0: no SuperNode connected within {NODE_WAIT_S} s; start SuperNodes or set num-clients"
            )
        time.sleep(poll_s)


def check_resume_config(cfg: RunConfig, stored: dict) -> None:
    """A resumed run keeps the config it was started with; name every key that differs."""
    cfg.check_resumed(f"resume-from = {cfg.resume_from!r}", stored)


def reopen_run(cfg: RunConfig):
    run = RunDir.reopen(cfg.resume_from)
    stored = run.read_config()
    if stored.get("kind") != "federated":
        raise ConfigError(
            f"resume-from = {cfg.resume_from!r}: a {stored.get('kind')} run; resume it with fl-ietagc resume"
        )
    check_resume_config(cfg, stored)
    blob = run.read_resume()
    return run, int(stored["num_clients"]), int(blob["round"]), blob["net"], blob["ema"], blob["state"]


def begin_run(cfg: RunConfig, run: RunDir, num_clients: int, shards: list[np.ndarray], net: dict, ema: dict) -> dict:
    """Record a new run and its round-0 commit point; returns the saved server state."""
    splits = load_splits(cfg)
    launch = json.loads(os.environ.get("FL_IETAGC_BACKEND_CONFIG", "null"))  # set by flower-simulation
    run.begin(
        cfg.to_dict(),
        shards,
        cfg.num_server_rounds,
        kind="federated",
        num_clients=num_clients,
        backend_config=launch,
        num_parameters=sum(v.numel() for v in net.values()),
        image_size=image_size(cfg),
        channels=splits.train.channels,
        num_train_images=len(splits.train),
    )
    n = len(splits.train)
    state = ServerState(
        token=uuid.uuid4().hex,
        shards=shards,
        state_rounds=[0] * num_clients,
        skip_totals=np.zeros(n, np.int64),
        skip_period=np.zeros(n, np.int64),
    )
    np.random.seed(cfg.seed)  # Flower's DP wrapper draws its noise from numpy's global generator
    saved = state.to_saved(build_strategy(cfg, num_clients))
    run.write_resume(0, net, ema, saved)
    return saved


def run_federated(
    grid: Grid, cfg: RunConfig, run: RunDir, num_clients: int, start_round: int, net: dict, ema: dict, saved: dict
) -> None:
    state = ServerState.from_saved(saved)
    check_secure_aggregation(cfg, state.shards)  # (num-clients = 0: K is known only now)
    if cfg.dp_noise_multiplier:
        rdp_accountant()  # (opacus installed: else the run stops here, not after round 1)
    strategy = build_strategy(cfg, num_clients)
    import_state(strategy, saved["strategy"])
    layout = Layout.of(pack_weights(net, ema), cfg.transport_dtype)
    strategy.setup_app(num_clients, cfg.client_failures, cfg.min_clients_fraction, cfg.node_wait_s, layout=layout)
    strategy.use_shards(ret.ShardAssignment(state.shards, redistributed=state.ret_events > 0))
    run.write_shards(state.shards)
    log(
        INFO,
        "fl-ietagc: %d clients, shard sizes %s, %s (%s parameters), rounds %d..%d of %d x %d local epochs",
        num_clients,
        [len(s) for s in state.shards],
        model_description(cfg),
        f"{sum(v.numel() for v in net.values()):,}",
        start_round + 1,
        cfg.num_server_rounds,
        cfg.num_server_rounds,
        cfg.local_epochs,
    )

    log(
        INFO,
        "fl-ietagc: weights travel as %d flat arrays, %.1f MB per message (transport-dtype = %s)",
        len(layout.groups()),
        wire_bytes(layout) / 1e6,
        layout.transport,
    )
    arrays = as_record(flatten(pack_weights(net, ema), layout))
    commits = RoundCommits(start_round, state.state_rounds, WRITE_TIMEOUT_S)
    try:
        rounds(grid, cfg, run, strategy, state, layout, arrays, commits, num_clients, start_round)
    finally:
        # a stop or failure mid-round still makes the round before it durable (without marking the status,
        # which the lifecycle writes next)
        if commits.pending:
            try:
                commits.settle()
            except CommitError as e:
                log(ERROR, "fl-ietagc: %s", e)
            else:
                status = run.read_status()
                if status["status"] == "interrupted":  # (marked by the signal handler before this commit landed)
                    run.mark_interrupted(status.get("error", ""))


def rounds(grid, cfg, run, strategy, state, layout, arrays, commits, num_clients, start_round) -> None:
    """Rounds start_round + 1 .. R, then the final weights and samples. Each round's commit runs on a thread while
    the next round's clients train (fl_ietagc/runs/round_commits.py)."""

    def settle_commit(phase="server: commit, waited for (written on a thread)"):  # the previous round made
        with phases.timed(phase):  # durable, and said so in status.json
            durable = commits.settle()
        if durable is not None:
            run.write_status("running", round=durable, num_rounds=cfg.num_server_rounds)

    def exchange_settled(*args, **kwargs):  # the replies are in; nothing of this round is acted on before
        out = exchange(*args, **kwargs)  # the previous round is durable
        settle_commit()
        return out

    t_start = time.time()
    before = (run.read_metrics() or [{}])[-1].get("elapsed-s", 0.0)  # training time of earlier sessions
    for server_round in range(start_round + 1, cfg.num_server_rounds + 1):
        # Train: the instruction out, the replies in, sorted out and aggregated by the strategy.
        instruction = round_instruction(run, state, num_clients, commits.durable_state_rounds)
        if cfg.secure_aggregation == "off":
            messages = strategy.configure_train(server_round, arrays, instruction, grid)
            replies, timing = exchange_settled(grid, messages, cfg.round_timeout_s)
            fault_point("after-replies", server_round)
            t_aggregate, why = time.time(), ""
        try:
            if cfg.secure_aggregation == "off":
                new_arrays, outcome = strategy.aggregate_round(server_round, replies)
            else:  # no reply holds one client's weights: Flower's SecAgg+ stages give their masked sum
                secure = secure_round(
                    grid, strategy, cfg, server_round, arrays, instruction, state.shards, exchange_settled
                )
                new_arrays, outcome, replies, timing = secure.arrays, secure.outcome, secure.replies, secure.timing
                t_aggregate, why = secure.train_done_at, secure.why  # (aggregate-s: the unmask stage and the rule)
        except ClientRoundError as e:
            write_client_logs(run, server_round, e.failures)
            raise
        write_client_logs(run, server_round, outcome.failures)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: {why or 'the strategy aggregated nothing'}")
        arrays = new_arrays
        timing["aggregate-s"] = time.time() - t_aggregate
        phases.add("server: aggregation", timing["aggregate-s"])
        # Commit: server state (RET included), metrics.json, checkpoint, resume point (on a thread).
        t0 = time.perf_counter()
        settle_commit()  # (already durable unless the round had no exchange)
        record, commit = end_round(
            cfg,
            run,
            strategy,
            state,
            server_round,
            outcome,
            arrays,
            before + time.time() - t_start,
            layout,
            round_timing(replies, timing),
        )
        commits.submit(server_round, state.state_rounds, commit)
        phases.since("server: commit, on the main thread (weights and state snapshot)", t0)
        elapsed = time.time() - t_start
        done = server_round - start_round
        log(
            INFO,
            "fl-ietagc: round %d/%d  loss %.4f  skip-rate %.3f (per client %s)  img/s per client %s%s  "
            "elapsed %.0fs  eta %.0fs",
            server_round,
            cfg.num_server_rounds,
            record["loss"],
            record["skip-rate"],
            " ".join(f"{r:.3f}" for r in record["skip-rate-per-client"]),
            " ".join(f"{(c['kept'] + c['skipped']) / max(c['seconds'], 1e-9):.0f}" for c in record["clients"]),
            f"  FAILED partitions {[f['partition-id'] for f in record['failed']]}" if record["failed"] else "",
            elapsed,
            elapsed / done * (cfg.num_server_rounds - server_round),
        )
        fault_point("between-rounds", server_round, ready=settle_commit)

    settle_commit("end of run: the last round's commit (no next round to overlap it)")
    final_net, final_ema = unpack_weights(unflatten(numpy_arrays(arrays), layout))
    run.finish(final_net, final_ema, cfg.num_server_rounds, cfg.to_dict())
    fault_point("final-sampling", cfg.num_server_rounds)
    if cfg.sample_count:
        model = build_for_config(cfg)
        load_weights(model, final_net, "final global weights")
        write_sample_grid(cfg, model, run.samples_path, pick_device(cfg.device))  # raw weights, as the paper
    run.mark_completed(cfg.num_server_rounds, seconds_this_session=time.time() - t_start)
    log(INFO, "fl-ietagc: done in %.0fs. run directory: %s", time.time() - t_start, run.path)
    log(
        INFO,
        "fl-ietagc:   metrics %s | final weights %s | samples %s",
        run.metrics_path,
        run.final_checkpoint,
        run.samples_path if cfg.sample_count else "(sample-count = 0)",
    )


def round_instruction(
    run: RunDir, state: ServerState, num_clients: int, durable_state_rounds: list[int] | None = None
) -> ConfigRecord:
    """This round's train instruction (fl_ietagc/federation/protocol.py): configure_train's `config`, which the
    strategy copies into every client's message (Flower adds server-round, the strategy its own flags and RET
    shards). `durable_state_rounds`: the client states the last durable commit starts from (kept by the clients)."""
    return ConfigRecord(
        {
            P.RUN_DIR: str(run.path),
            P.RUN_TOKEN: state.token,
            P.NUM_CLIENTS: num_clients,
            P.STATE_ROUNDS: list(state.state_rounds),
            P.KEEP_STATES_FROM: list(state.state_rounds if durable_state_rounds is None else durable_state_rounds),
        }
    )


def write_client_logs(run: RunDir, server_round: int, failures: list[ClientFailure]) -> None:
    """Each failed client's traceback (or its one line) in logs/client-p<P>-r<R>.log."""
    for f in failures:
        run.write_log(f"client-p{f.partition_id}-r{server_round}.log", f.traceback or f.line())


def exchange(grid: Grid, messages, timeout: float, poll_s: float = REPLY_POLL_S) -> tuple[list, dict]:
    """Push a round's messages and pull their replies, asking every `poll_s` until all are in or `timeout` passed.
    Also returns when each step happened: send-s (pushing the messages), and per reply the server's wall clock
    when it arrived (reply-at, by the id of the message it answers)."""
    messages = list(messages)
    t0 = time.time()
    waiting = set(grid.push_messages(messages))
    sent_at = time.time()
    replies, arrived = [], {}
    while waiting and time.time() - sent_at < timeout:
        got = list(grid.pull_messages(waiting))
        now = time.time()
        for m in got:
            arrived[m.metadata.reply_to_message_id] = now
        waiting -= set(arrived)
        replies += got
        if waiting:
            time.sleep(poll_s)
    return replies, {"send-s": sent_at - t0, "sent-at": sent_at, "reply-at": arrived}


def round_timing(replies: list, timing: dict) -> dict:
    """A round's wall time split per client: train-s (the client's training), receive-s (the instruction pushed
    -> the client's handler started: the SuperNode's pull, the transfer), handler-s (the client's whole handler:
    unpacking, state load/save, training, packing), send-s (reply ready -> the server had it: the SuperNode's push,
    the transfer, the server's pull). Both ends read one wall clock on one machine; across machines only
    receive-s + send-s is exact unless the clocks are synchronised."""
    out = {"send-s": timing["send-s"], "aggregate-s": timing.get("aggregate-s", 0.0), "clients": []}
    for m in replies:
        info = None if m.has_error() else m.content.config_records.get(P.INFO)
        arrived = timing["reply-at"].get(m.metadata.reply_to_message_id)
        if info is None or P.RECEIVED_AT not in info or arrived is None:
            continue
        received, replied = float(info[P.RECEIVED_AT]), float(info[P.REPLIED_AT])
        out["clients"].append(
            {
                "partition-id": int(info["partition-id"]),
                "train-s": float(m.content.metric_records[P.METRICS]["seconds"]),
                "receive-s": received - timing["sent-at"],
                "handler-s": replied - received,
                "send-s": arrived - replied,
            }
        )
    out["clients"].sort(key=lambda c: c["partition-id"])
    return out


def end_round(
    cfg: RunConfig,
    run: RunDir,
    strategy,
    state: ServerState,
    server_round: int,
    outcome: RoundReplies,
    arrays: ArrayRecord,
    elapsed: float,
    layout: Layout,
    timing: dict | None = None,
) -> tuple[dict, Callable[[], None]]:
    """Fold the round's client reports into the server state (RET included); returns the round's record and the
    function that commits it (run by RoundCommits on a thread)."""
    clients = outcome.clients
    for c in clients:
        np.add.at(state.skip_totals, c.image_ids, c.skip_counts)
        np.add.at(state.skip_period, c.image_ids, c.skip_counts)
        state.state_rounds[c.partition_id] = server_round  # a failed client's state is not advanced
    moved = 0
    new = ret.after_round(cfg, state.shards, state.skip_period, server_round)
    if new is not None:
        state.ret_events += 1
        moved = ret.moved_count(state.shards, new)
        state.shards = new
        state.skip_period[:] = 0
        run.write_shards(state.shards)
        strategy.use_shards(ret.ShardAssignment(state.shards, redistributed=True))
    privacy = round_privacy(
        cfg,
        strategy.num_clients,
        [c.num_examples for c in clients],
        [m for m in run.read_metrics() if m["round"] < server_round],
    )
    record = round_record(
        server_round,
        elapsed,
        outcome.metrics,
        ret_moved=moved,
        clients=clients,
        failures=outcome.failures,
        timing=timing,
        privacy=privacy,
    )
    last = server_round == cfg.num_server_rounds
    saved = state.to_saved(strategy)  # (a copy: this round's, not the next's)

    def commit() -> None:  # on RoundCommits' thread; reads only what no later round changes
        net, ema = unpack_weights(unflatten(numpy_arrays(arrays), layout))
        run.commit_round(
            server_round,
            record,
            net=net,
            ema=ema,
            state=saved,
            config=cfg.to_dict(),
            skip_counts=saved["skip-totals"].numpy(),
            keep_checkpoint=last or server_round % cfg.checkpoint_every == 0,
            num_rounds=cfg.num_server_rounds,
            write_status=False,  # (the ServerApp marks a round in status.json once it is durable)
        )

    return record, commit


def model_description(cfg: RunConfig) -> str:
    """What trains, for the log: `preset` only picks pixel-space UNets; a latent-t2i run trains pretrained-dir's."""
    if cfg.model_type == "latent-t2i":
        return f"text-to-image UNet from {cfg.pretrained_dir}"
    return f"{cfg.preset} preset"
