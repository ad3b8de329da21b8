"""A long-lived ClientApp process for a SuperNode started with `flower-supernode --isolation process`.

Why this exists (Flower 1.41, read in its source): a SuperNode never runs a ClientApp itself. With the default
`--isolation subprocess` it starts `flower-superexec` (supernode/start_client_internal.py, `start_client_internal`),
whose loop (supercore/superexec/run_superexec.py, `run_superexec`) claims each task with `AcquireTask` and has
`SubprocessExecutor.launch` (supercore/superexec/executor/subprocess_executor.py) start a fresh
`flwr-clientapp --token T` for it. `flwr-clientapp` (supernode/cli/flwr_clientapp.py) requires a task token
(`add_args_flwr_app_common`: `--token`/`--token-file`, required) and `run_clientapp`
(supernode/runtime/run_clientapp.py) pulls that one task, runs it and ends with `flwr_exit`: one process per
message, and every one imports torch and diffusers again. `--isolation process` only stops the SuperNode from
starting the SuperExec; a separately started `flower-superexec` still launches one `flwr-clientapp` per task (its
"warm executor pools" exist only for the Kubernetes executor and only for agent/model/connector tasks,
supercore/superexec/executor/factory.py). `--clientappio-api-address` is gone (rejected; `--host/--port` set the
SuperNode's Runtime API).

This process takes the SuperExec's place beside one SuperNode started with `--isolation process`: it claims each
ClientApp task with the same `AcquireTask` call and runs it in this process with Flower's own steps
(`pull_task_input`, FAB install, `load_app`, the ClientApp call, `push_message`, `push_task_output`, a task
heartbeat), then waits for the next one. Imports, the per-process data cache (`fl_ietagc.data.datasets.load_splits`) and
compiled UNets stay warm from round to round, as in a Ray actor. Client state is in files, so nothing else carries
over: results equal those of a fresh process per message (tests/test_deployment.py).

    flower-supernode --isolation process --port 9300 ... &
    python -m experiments.launch.warm_clientapp --runtime-api-address 127.0.0.1:9300 --insecure --parent-pid $! \\
        [--superexec-auth-secret-file F] [--preload torch,diffusers]

The app code is loaded from the FAB as Flower loads it. This module imports only Flower, so no app module is
imported from elsewhere first; a task whose FAB differs from the one loaded (a new app version) makes the process
re-execute itself (same pid) and serve that task with fresh modules. With `--superexec-auth-secret-file` (the same
file as the SuperNode's) only holders of the secret can claim tasks. SIGINT/SIGTERM, or the death of
`--parent-pid`, end it at once (a task in flight is reported failed to the SuperNode).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
HANDOVER_ENV = "FL_IETAGC_HANDOVER_TOKEN"  # a claimed task for the re-executed process (argv is world-readable)


class Stop(BaseException):
    """SIGINT/SIGTERM (or the parent's death, which Flower's monitor turns into SIGINT)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(text: str) -> None:
    print(f"warm-clientapp[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.launch.warm_clientapp", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--runtime-api-address",
        required=True,
        metavar="HOST:PORT",
        help="the SuperNode's Runtime API (its --host/--port)",
    )
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="the Runtime API is plain HTTP (the SuperNode has no --ssl-certfile; it listens on 127.0.0.1 by default)",
    )
    tls.add_argument("--root-certificates", metavar="CA", help="CA that signed the Runtime API's certificate")
    p.add_argument(
        "--superexec-auth-secret-file",
        metavar="FILE",
        help="the SuperNode's --superexec-auth-secret-file: sign AcquireTask with it",
    )
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.25,
        metavar="S",
        help="seconds between AcquireTask calls while idle (default 0.25)",
    )
    p.add_argument(
        "--preload",
        default="",
        metavar="MOD[,MOD]",
        help="third-party modules to import at start, before the first task (e.g. torch,diffusers); "
        "never the app's own modules, which come from the FAB",
    )
    args = p.parse_args(argv)
    if args.poll_interval <= 0:
        p.error("--poll-interval must be > 0")
    return args


def retry_invoker(max_tries: int | None, max_time: float | None):
    """Flower's HTTP retry policy, minus its one-shot-process reactions (on 401 it SIGINTs its own process)."""
    import httpx
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (502, 503, 504)
        return any(t in str(exc).lower() for t in ("certificate", "ssl", "tls"))

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=max_tries,
        max_time=max_time,
        should_giveup=give_up,
    )


class Worker:
    def __init__(self, args: argparse.Namespace, argv: list[str]):
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.args, self.argv = args, argv
        self.certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
        self.secret = None
        if args.superexec_auth_secret_file:
            from flwr.supercore.auth import load_superexec_auth_secret

            self.secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
        self.installed: set[str] = set()  # FAB hashes installed by this process
        self.loaded_fab: str | None = None  # the FAB whose modules this process has imported
        self.tasks = 0

    def client(self, interceptors, invoker):
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

        return RuntimeHttpClient.from_server_address(
            server_address=self.args.runtime_api_address,
            insecure=self.args.insecure,
            root_certificates=self.certificates,
            retry_invoker=invoker,
            interceptors=[RuntimeTracingInterceptor(), *interceptors],
        )

    def acquire_client(self):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

        extra = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.secret:
            extra.append(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={ACQUIRE}))
        return self.client(extra, retry_invoker(1, None))  # serve() retries, at its own pace

    def serve(self) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        handover = os.environ.pop(HANDOVER_ENV, "")
        if handover:
            self.run_task(handover)
        acquire = self.acquire_client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        waiting_since = None
        say(f"serving ClientApp tasks of the SuperNode at {self.args.runtime_api_address}")
        while True:
            try:
                res = acquire.AcquireTask(request)
                waiting_since = None
            except httpx.HTTPStatusError as e:
                if e.response.status_code in (401, 403):
                    raise SystemExit(
                        f"warm-clientapp: the SuperNode refused AcquireTask (HTTP "
                        f"{e.response.status_code}): is it started with --isolation process, and with "
                        f"the same --superexec-auth-secret-file?"
                    ) from None
                raise
            except httpx.TransportError:  # the SuperNode is not up yet, or restarting
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > 5 and int(time.monotonic() - waiting_since) % 30 == 0:
                    say(f"waiting for the SuperNode's Runtime API at {self.args.runtime_api_address}")
                time.sleep(self.args.poll_interval)
                continue
            if res.HasField("task") and res.token:
                fab = res.task.fab_hash or None
                if self.loaded_fab and fab and fab != self.loaded_fab:
                    self.reexec(res.token, fab)
                self.run_task(res.token)
            else:
                time.sleep(self.args.poll_interval)

    def reexec(self, token: str, fab: str) -> None:
        """A new app version: the same process image again, fresh modules, serving the claimed task first."""
        say(f"the next task runs FAB {fab[:12]}, this process has {self.loaded_fab[:12]} loaded: restarting")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(
            sys.executable,
            [sys.executable, "-m", "experiments.launch.warm_clientapp", *self.argv],
            {**os.environ, HANDOVER_ENV: token},
        )

    def run_task(self, token: str) -> None:
        """Flower's run_clientapp for one task, without its process exit."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        invoker = retry_invoker(None, 300)
        client = self.client(
            [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
            invoker,
        )
        heartbeat = HeartbeatSender(task_heartbeat(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t0, what = time.monotonic(), "?"
        phases = {}  # seconds: pull (message in), app (install + load + the ClientApp), push (reply out)
        try:
            message, context, run, fab = pull_task_input(client)
            phases["pull"] = time.monotonic() - t0
            what = f"run {run.run_id}, {message.metadata.message_type}"
            if fab.hash_str not in self.installed:
                install_from_fab(fab.content, skip_prompt=True)
                self.installed.add(fab.hash_str)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str
            )
            self.loaded_fab = fab.hash_str
            reply = app(message=message, context=context)
            phases["app"] = time.monotonic() - t0 - phases["pull"]
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # as run_clientapp: the reply becomes an Error, this process goes on
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code, reason = (
                    ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                    "An exception was raised when attempting to load `ClientApp`",
                )
            say(f"task ({what}) raised {type(ex).__name__}: {ex}")
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        except Stop:
            invoker.max_tries = 1  # one quick try to tell the SuperNode, then exit
            details = "ClientApp process stopped"
            reply = None
            raise
        finally:
            t_push = time.monotonic()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:
                say(f"could not push the reply ({what}): {type(ex).__name__}: {ex}")
            finally:
                phases["push"] = time.monotonic() - t_push
                push_task_output(client=client, context=context, sub_status=status, details=details)
                phases["output"] = time.monotonic() - t_push - phases["push"]
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
        self.tasks += 1
        say(
            f"task {self.tasks} ({what}) {status} in {time.monotonic() - t0:.1f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
            + ")"
        )


PULL_BACKOFF = (0.05, 0.5)  # (first, longest) wait between tries for a message object the SuperNode lacks yet


def pull_task_input(client):
    """Flower's run_clientapp.pull_task_input, polling for the message's objects every <= 0.5 s.

    The SuperNode creates the task as soon as the message's metadata arrives, then downloads its objects from the
    SuperLink (seconds). A fresh `flwr-clientapp` spends seconds importing before it asks for them; this process
    asks at once, and with Flower's default retry backoff for an object not there yet (waits of 1, 2, 4, 8, then
    10 s: PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP in flwr/supercore/constant.py) an object could sit at the
    SuperNode for up to 10 s before being taken."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF[0],
        backoff_cap=PULL_BACKOFF[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: the deflated message lacks its id
    return message, context, run, fab


def task_heartbeat(client):
    """Flower's task heartbeat, except that an expired task is only logged (Flower SIGINTs its own process)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            say(f"task heartbeat refused (HTTP {err.response.status_code}); the task has expired")
            return True
        if not res.success:
            say("the SuperNode no longer knows this task (expired); its reply will be refused")
        return True

    return fn


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def stop(signum, frame):
        raise Stop(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)
    try:
        if args.parent_pid is not None:
            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(args.parent_pid)  # the parent's death -> SIGINT here
        for name in filter(None, (m.strip() for m in args.preload.split(","))):
            importlib.import_module(name)
        Worker(args, argv).serve()
    except Stop as s:
        say(f"{s}: stopped")
        return 128 + s.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
