"""The front-end sweep of ``python -m bench frontend``: the server with 0, 1, 2, 4 … front-end
processes (``resnet-serve serve --frontends N``), side by side in one run.

One server per front-end count runs for the whole sweep (``--frontends 0`` is the single
process); rounds alternate between them (the order reversed every other round) so that
drift on a shared machine falls on all alike. Each slice drives one server with
perf_analyzer: one client at concurrency 1, else up to ``clients`` client processes with the
concurrency split between them (one HTTP/2 connection lands on one front end, so the load
comes over several connections for the kernel to spread). Without perf_analyzer the SDK's
load generator drives it instead, one channel (its own connection) per client. The calls
are v2 gRPC, or with ``protocol`` ``http`` v2 HTTP/REST with binary tensor data to the
HTTP port, which the front ends share as they share the gRPC port (perf_analyzer only;
the floors below speak gRPC and are left out).

Per slice, from the server itself:

- **CPU by process role**: utime + stime from ``/proc/<pid>/stat`` of every process of the
  server's tree before and after, summed by role: ``engine`` (comm ``rs-engine``),
  ``frontends`` (comm ``rs-frontend-*``), ``other`` (anything else in the tree) and
  ``whole``; with ``--frontends 0`` the one process is only ``whole``;
- **requests** (``resnet_serve_requests_total``, code OK) and the **mean batch size**
  (``resnet_serve_batch_size`` sum / count), as deltas of the server's /metrics, which
  merges every process.

From those, per configuration: CPU µs per request by role, and the **projected ceiling**
of a K-core node, one core for the engine and the rest for front ends:
``min(1e6 / engine µs, (K - 1) * 1e6 / front-end µs)`` (`ceiling`), beside the single
process's own (``1e6 / whole µs``) and what it measured.

**The floor** (`bench.floor`: a bare ``grpc.aio`` v2 server answering a fixed output, one
process) runs beside them as one more configuration of every round (`FLOOR`, its rows'
``frontends``), its requests counted by its ModelStatistics. Each configuration's whole
CPU per request is also given as a multiple of the floor's at the same model and
concurrency (``x_floor``): hosts of one kind differ by 2× and more through gRPC, and that
ratio, measured side by side, is what carries from one to another.

**The split floor** (`bench.floor` with ``--split``, `SPLIT_FLOOR`) runs with it: the floor
answering through the split's transport alone (the input written into a shared-memory
slot, a frame each way over `server.ipc` to an echo engine process that writes the
logits into the slot). Its two processes are counted as a front end and an engine, so its
row shows what the split costs at the least, by role, beside what the server's front ends
and engine cost over it.

**The baseline** (``baseline``, a git revision; `BASELINE`, its rows' ``frontends``): the
single process of another commit (its ``server`` package from ``git archive``, this tree's
bench and client; `bench.serving.baseline_command`) as one more configuration of every
round, so that the split can be read against the server as it was before it, in one run:
its rows give each configuration's requests/s over the baseline's and, at concurrency 1,
the p50 against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from resnet_serve_client import report
from resnet_serve_client.bench import Level, LevelResult, Stop, run_level
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc

from bench import floor, perf_analyzer
from bench.cli import say
from bench.serving import Server, baseline_command, commit_of, start

ENGINE = "rs-engine"
FRONTEND = "rs-frontend-"
ROLES = ("engine", "frontends", "other", "whole")
CORES = (16, 32)  # the nodes the ceiling is projected for
FLOOR = -1  # the floor's place among the front-end counts (its rows' ``frontends``)
SPLIT_FLOOR = -2  # the split floor's
BASELINE = -3  # the baseline commit's single process
ONE_PROCESS = (0, FLOOR, BASELINE)  # the configurations whose CPU is only "whole"
PROTOCOLS = {"grpc": "v2 gRPC", "http": "v2 HTTP/REST with binary tensor data"}
CALL_TIMEOUT = 60.0
_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class SweepPlan:
    models: tuple[str, ...] = ("null", "resnet20")
    frontends: tuple[int, ...] = (0, 1, 2, 4)
    concurrencies: tuple[int, ...] = (1, 16, 64)
    clients: int = 4  # client processes at concurrency ≥ clients (fewer below)
    seconds: float = 3.0  # measured per cell, over all rounds
    rounds: int = 2
    warmup: float = 0.5  # per server and model, unrecorded, before the first round
    device: str = "cpu"
    client: str = "perf_analyzer"  # or "sdk"
    server_flags: tuple[str, ...] = ()
    cores: tuple[int, ...] = CORES
    floor: bool = True  # the bare grpc.aio floor and the split floor as two more configurations
    protocol: str = "grpc"  # or "http": v2 REST with binary tensor data (perf_analyzer -i http)
    baseline: str | None = None  # a git revision whose single process runs beside (`BASELINE`)

    def configurations(self) -> tuple[int, ...]:
        """The front-end counts, `BASELINE` with a baseline, then `FLOOR` and `SPLIT_FLOOR`
        when the floors are measured (they speak gRPC alone: not over HTTP)."""
        found = (*self.frontends, *([BASELINE] if self.baseline else []))
        if self.floor and self.protocol == "grpc":
            return (*found, FLOOR, SPLIT_FLOOR)
        return found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# /proc: the server's process tree and its CPU


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    cpu: float  # utime + stime, seconds, every thread of the process (ended ones included)


def parse_stat(pid: int, text: str) -> Proc:
    """One ``/proc/<pid>/stat`` line; the comm (in parentheses) may hold spaces and ')'."""
    head, _, tail = text.rpartition(")")
    comm = head.split("(", 1)[1]
    fields = tail.split()  # fields[0] is the state (field 3 of proc(5))
    ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
    return Proc(pid, ppid, comm, (utime + stime) / _TICKS)


def _all_processes() -> Iterator[Proc]:
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone while read
            yield parse_stat(int(entry.name), (entry / "stat").read_text())


def process_tree(root: int, processes: Iterable[Proc] | None = None) -> dict[int, Proc]:
    """`root` and its descendants, by pid (empty if `root` is gone)."""
    found = {p.pid: p for p in (_all_processes() if processes is None else processes)}
    if root not in found:
        return {}
    children: dict[int, list[int]] = {}
    for proc in found.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree[pid] = found[pid]
        todo += children.get(pid, [])
    return tree


def role(comm: str) -> str:
    if comm in (ENGINE, floor.ECHO_ENGINE):
        return "engine"
    if comm.startswith(FRONTEND) or comm == floor.SPLIT_FRONTEND:
        return "frontends"
    return "other"


def cpu_by_role(before: dict[int, Proc], after: dict[int, Proc]) -> dict[str, float]:
    """CPU seconds each role spent between two readings of a tree (`process_tree`), and
    ``whole``, their sum. A process that appeared in between counts whole; one that ended in
    between loses what it spent since `before` (`replaced` says whether that happened)."""
    spent = dict.fromkeys(ROLES, 0.0)
    for pid, proc in after.items():
        earlier = before.get(pid)
        delta = proc.cpu - (earlier.cpu if earlier is not None else 0.0)
        spent[role(proc.comm)] += delta
        spent["whole"] += delta
    return spent


def replaced(before: dict[int, Proc], after: dict[int, Proc]) -> int:
    """Processes of `before` that are gone from `after` (a front end that died)."""
    return len(set(before) - set(after))


def roles_of(tree: dict[int, Proc]) -> dict[str, int]:
    """How many processes of each role a tree holds."""
    counts = dict.fromkeys(ROLES[:-1], 0)
    for proc in tree.values():
        counts[role(proc.comm)] += 1
    return counts


# the arithmetic


def ceiling(engine_us: float, frontend_us: float, cores: int) -> float:
    """Requests/s a node of `cores` cores could serve: the engine on one core, front ends on
    the other ``cores - 1``, each bounded by its CPU per request."""
    if cores < 2:
        raise ValueError("an engine and a front end need two cores at least")
    if engine_us <= 0 or frontend_us <= 0:
        raise ValueError("CPU per request must be positive")
    return min(1e6 / engine_us, (cores - 1) * 1e6 / frontend_us)


def split(concurrency: int, clients: int) -> list[int]:
    """`concurrency` shared by ``min(clients, concurrency)`` client processes, evenly."""
    n = max(1, min(clients, concurrency))
    base, extra = divmod(concurrency, n)
    return [base + (i < extra) for i in range(n)]


def merge(results: Sequence[LevelResult], concurrency: int) -> LevelResult:
    """Clients that ran at once as one measurement: their requests and latencies together,
    the seconds such that its throughput is the sum of theirs."""
    merged = LevelResult(concurrency, None, 1)
    rate = 0.0
    for result in results:
        merged.ok += result.ok
        merged.errors.update(result.errors)
        merged.latencies += result.latencies
        if result.seconds > 0:
            rate += result.ok / result.seconds
    longest = max((r.seconds for r in results), default=0.0)
    merged.seconds = merged.ok / rate if rate > 0 else longest
    return merged


@dataclass(frozen=True)
class Counts:
    """What a server's /metrics says of one model: requests answered OK and failed, and the
    batch size histogram's sum and count."""

    ok: float = 0.0
    failed: float = 0.0
    batch_sum: float = 0.0
    batch_count: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.ok + other.ok,
            self.failed + other.failed,
            self.batch_sum + other.batch_sum,
            self.batch_count + other.batch_count,
        )

    def __sub__(self, other: Counts) -> Counts:
        return self + Counts(-other.ok, -other.failed, -other.batch_sum, -other.batch_count)


def counts(text: str, model: str) -> Counts:
    ok = failed = batch_sum = batch_count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "resnet_serve_requests":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("model") == model:
                    if s.labels.get("code") == "OK":
                        ok += s.value
                    else:
                        failed += s.value
        elif family.name == "resnet_serve_batch_size":
            for s in family.samples:
                if s.labels.get("model") != model:
                    continue
                if s.name.endswith("_sum"):
                    batch_sum += s.value
                elif s.name.endswith("_count"):
                    batch_count += s.value
    return Counts(ok, failed, batch_sum, batch_count)


# the measurement


@dataclass
class Cell:
    """One (model, front ends, concurrency), summed over its slices."""

    model: str
    frontends: int
    concurrency: int
    clients: int
    result: LevelResult
    counted: Counts = field(default_factory=Counts)
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    replaced: int = 0

    def add(self, result: LevelResult, counted: Counts, cpu: dict[str, float], gone: int) -> None:
        self.result.add(result)
        self.counted += counted
        for name, seconds in cpu.items():
            self.cpu[name] += seconds
        self.replaced += gone

    def row(self) -> dict[str, Any]:
        requests = self.counted.ok
        per = 1e6 / requests if requests > 0 else 0.0
        us = {name: round(seconds * per, 1) for name, seconds in self.cpu.items()}
        if self.frontends in ONE_PROCESS:  # one process: only "whole"
            us = {"whole": us["whole"]}
        elif not us["other"]:
            del us["other"]
        batch = self.counted
        return {
            "model": self.model,
            "frontends": self.frontends,
            "clients": self.clients,
            **report.row(self.result),
            "server_requests": int(requests),
            "server_failed": int(self.counted.failed),
            "batch_mean": (
                round(batch.batch_sum / batch.batch_count, 2) if batch.batch_count else None
            ),
            "cpu_us_per_request": us,
            "server_cores": round(self.cpu["whole"] / max(1e-9, self.result.seconds), 2),
            "processes_replaced": self.replaced,
        }


@contextlib.contextmanager
def servers(repo: Path, work: Path, plan: SweepPlan) -> Iterator[dict[int, Server]]:
    """A server per front-end count (and the baseline and the floors, under `BASELINE`,
    `FLOOR` and `SPLIT_FLOOR`), all running at once; stopped on exit."""
    flags = ["--device", plan.device, "--no-reflection", *plan.server_flags]
    with contextlib.ExitStack() as stack:
        running: dict[int, Server] = {}
        for n in plan.configurations():
            if n in (FLOOR, SPLIT_FLOOR):
                split_ = ["--split"] if n == SPLIT_FLOOR else []
                say(f"starting the {_configuration(n)} over {repo}")
                running[n] = start(
                    repo, work / f"floor{'-split' * bool(split_)}.log", split_,
                    command=floor.COMMAND,
                )  # fmt: skip
            elif n == BASELINE:
                assert plan.baseline is not None
                say(f"starting the single process of {plan.baseline} over {repo} {' '.join(flags)}")
                running[n] = start(
                    repo, work / "server-baseline.log", flags,
                    command=baseline_command(plan.baseline, work / "baseline"),
                )  # fmt: skip
            else:
                say(f"starting the server with --frontends {n} over {repo} {' '.join(flags)}")
                running[n] = start(
                    repo, work / f"server-frontends-{n}.log", [*flags, "--frontends", str(n)]
                )
            stack.callback(_stop, running[n])
        yield running


def _stop(server: Server) -> None:
    with contextlib.suppress(Exception):
        server.stop()


async def _drive(
    server: Server,
    model: str,
    request: pb.ModelInferRequest,
    concurrency: int,
    seconds: float,
    plan: SweepPlan,
    work: Path,
) -> LevelResult:
    shares = split(concurrency, plan.clients)
    if plan.client == "perf_analyzer":
        inputs = {
            t.name: b for t, b in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        address = server.address
        if plan.protocol == "http":
            assert server.http_url is not None
            address = server.http_url.removeprefix("http://")
        results = await asyncio.gather(
            *(
                asyncio.to_thread(
                    perf_analyzer.measure,
                    address,
                    model,
                    share,
                    seconds,
                    work / f"client-{i}",
                    inputs,
                    plan.protocol,
                )
                for i, share in enumerate(shares)
            )
        )
    else:
        results = await asyncio.gather(
            *(_sdk_client(server.address, request, share, seconds) for share in shares)
        )
    return merge(results, concurrency)


async def _sdk_client(
    address: str, request: pb.ModelInferRequest, concurrency: int, seconds: float
) -> LevelResult:
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # a connection of its own
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)

        async def call(_: int) -> object:
            return await stub.ModelInfer(request, timeout=CALL_TIMEOUT)

        return await run_level(
            call, Level(concurrency), Stop(seconds=seconds), warmup=0, images_per_request=1
        )


async def _slice(
    server: Server,
    n: int,
    model: str,
    request: pb.ModelInferRequest,
    concurrency: int,
    seconds: float,
    plan: SweepPlan,
    work: Path,
) -> tuple[LevelResult, Counts, dict[str, float], int]:
    read = floor_counts if n in (FLOOR, SPLIT_FLOOR) else _metrics_counts
    before_counts = await asyncio.to_thread(read, server, model)
    before = process_tree(server.process.pid)
    result = await _drive(
        server, model, request, concurrency, seconds, plan, work / f"frontends-{n}"
    )
    after = process_tree(server.process.pid)
    after_counts = await asyncio.to_thread(read, server, model)
    return result, after_counts - before_counts, cpu_by_role(before, after), replaced(before, after)


def _metrics_counts(server: Server, model: str) -> Counts:
    return counts(server.metrics(), model)


def floor_counts(server: Server, model: str) -> Counts:
    """What the floor answered of `model`: it has no /metrics, and no batches."""
    with server.channel() as channel:
        stats = v2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=CALL_TIMEOUT
        )
    return Counts(ok=sum(s.inference_stats.success.count for s in stats.model_stats))


async def measure(
    running: dict[int, Server],
    requests: dict[str, pb.ModelInferRequest],
    plan: SweepPlan,
    work: Path,
) -> list[dict[str, Any]]:
    """Every cell of the sweep, in interleaved rounds; a row per cell."""
    if plan.warmup > 0:
        for server in running.values():
            for model, request in requests.items():
                await _drive(
                    server,
                    model,
                    request,
                    max(plan.concurrencies),
                    plan.warmup,
                    plan,
                    work / "warmup",
                )
    cells: dict[tuple[str, int, int], Cell] = {}
    seconds = plan.seconds / plan.rounds
    configurations = plan.configurations()
    for round_ in range(plan.rounds):
        order = list(configurations) if round_ % 2 == 0 else list(reversed(configurations))
        for concurrency in plan.concurrencies:
            for model, request in requests.items():
                for n in order:
                    key = (model, n, concurrency)
                    if key not in cells:
                        clients = len(split(concurrency, plan.clients))
                        result = LevelResult(concurrency, None, 1)
                        cells[key] = Cell(model, n, concurrency, clients, result)
                    cells[key].add(
                        *await _slice(
                            running[n], n, model, request, concurrency, seconds, plan, work
                        )
                    )
        say(f"front-end sweep: round {round_ + 1} of {plan.rounds} done")
    rows = []
    for model in requests:
        for concurrency in plan.concurrencies:
            for n in configurations:
                row = cells[(model, n, concurrency)].row()
                rows.append(row)
                cpu = ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_us_per_request"].items())
                say(
                    f"{model:>9} {_configuration(n):>14} c={concurrency:<3} "
                    f"{row['req_per_s']:8.1f} req/s "
                    f"p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:6.2f} ms batch "
                    f"{row['batch_mean']} CPU µs/req {cpu}"
                    + (f" errors {row['errors']}" if row["errors"] else "")
                )
    return rows


def run(
    repo: Path,
    requests: dict[str, pb.ModelInferRequest],
    plan: SweepPlan,
    work: Path,
) -> dict[str, Any]:
    """The sweep over `repo` (every model of `requests` served there): its JSON part."""
    if plan.client == "perf_analyzer" and (why := perf_analyzer.unavailable()) is not None:
        say(f"front-end sweep: perf_analyzer left out ({why}); the SDK drives it")
        plan = SweepPlan(**{**plan.as_dict(), "client": "sdk"})
    if plan.protocol != "grpc" and plan.client != "perf_analyzer":
        raise SystemExit(f"the sweep over {plan.protocol} needs perf_analyzer (the SDK's load "
                         "speaks gRPC): " + (perf_analyzer.unavailable() or "not chosen"))
    if plan.baseline is not None:  # the record names the commit, not a moving name
        plan = SweepPlan(**{**plan.as_dict(), "baseline": commit_of(plan.baseline)})
    with servers(repo, work, plan) as running:
        processes = {str(n): roles_of(process_tree(s.process.pid)) for n, s in running.items()}
        rows = asyncio.run(measure(running, requests, plan, work))
    return {
        "plan": plan.as_dict(),
        "processes": processes,
        "rows": rows,
        "ceilings": ceilings(rows, plan.cores),
    }


def cpu_concurrency(rows: list[dict[str, Any]]) -> int:
    """The concurrency the CPU table is read at: 64 if measured, else the highest."""
    levels = {r["concurrency"] for r in rows}
    return 64 if 64 in levels else max(levels, default=0)


def x_floor(rows: list[dict[str, Any]], row: dict[str, Any]) -> float | None:
    """`row`'s whole CPU per request as a multiple of the floor's at the same model and
    concurrency (None without the floor)."""
    bottom = _find(rows, row["model"], FLOOR, row["concurrency"])
    if bottom is None or not bottom["cpu_us_per_request"]["whole"]:
        return None
    return round(row["cpu_us_per_request"]["whole"] / bottom["cpu_us_per_request"]["whole"], 2)


def ceilings(rows: list[dict[str, Any]], cores: Sequence[int] = CORES) -> list[dict[str, Any]]:
    """Per model and configuration, at `cpu_concurrency`: CPU µs per request by role (and
    the whole as a multiple of the floor's), the measured requests/s and the ceiling
    (projected for each of `cores` with front ends; the single process's and the floor's
    own, 1e6 / whole µs, without)."""
    at = cpu_concurrency(rows)
    out = []
    for row in (r for r in rows if r["concurrency"] == at):
        us = row["cpu_us_per_request"]
        entry: dict[str, Any] = {
            "model": row["model"],
            "frontends": row["frontends"],
            "concurrency": at,
            "cpu_us_per_request": us,
            "x_floor": x_floor(rows, row),
            "req_per_s": row["req_per_s"],
        }
        if row["frontends"] in ONE_PROCESS:
            entry["ceiling"] = round(1e6 / us["whole"]) if us["whole"] > 0 else None
        elif us.get("engine", 0) > 0 and us.get("frontends", 0) > 0:
            entry["projected"] = {
                str(k): round(ceiling(us["engine"], us["frontends"], k)) for k in cores
            }
        out.append(entry)
    return out


# the report


def _find(rows: list[dict[str, Any]], model: str, n: int, c: int) -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["model"], r["frontends"], r["concurrency"]) == (model, n, c)), None
    )


def _configuration(n: int) -> str:
    if n == FLOOR:
        return "grpc.aio floor"
    if n == SPLIT_FLOOR:
        return "split floor"
    if n == BASELINE:
        return "baseline single process"
    return "single process" if n == 0 else f"{n} front end{'s' if n > 1 else ''}"


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def markdown(sweep: dict[str, Any]) -> list[str]:
    """The sweep's part of the report."""
    rows, plan = sweep["rows"], sweep["plan"]
    cores = plan["cores"]
    at = cpu_concurrency(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    protocol = plan.get("protocol", "grpc")
    floor_measured = any(r["frontends"] == FLOOR for r in rows)
    base = plan.get("baseline") if any(r["frontends"] == BASELINE for r in rows) else None
    out = [
        f"Front ends {', '.join(map(str, plan['frontends']))} (0: the single process)"
        + (f", the baseline single process of commit {base} (its `server` package, this "
           "tree's bench and client)" if base else "")
        + (", the bare `grpc.aio` floor (`bench.floor`, one process) and the split floor "
           "(the floor through a shared-memory slot and an echo engine process: the split's "
           "transport alone)" if floor_measured else "")
        + f", {plan['rounds']} interleaved rounds of {plan['seconds'] / plan['rounds']:.1f} s "
        f"per cell, device {plan['device']}, load by {plan['client']} over "
        f"{PROTOCOLS[protocol]}: one client at "
        f"concurrency 1, else {plan['clients']} client processes sharing the concurrency.",
        "",
        f"#### CPU per request by process, concurrency {at}",
        "",
        "CPU µs per request from `/proc/<pid>/stat` of the server's processes over the "
        "window, requests counted by the server's /metrics"
        + (" (the floor's by its ModelStatistics). × floor: the whole server's CPU per "
           "request over the floor's, measured side by side" if floor_measured else "")
        + ". Ceiling: the single process's" + (" (and the floor's)" if floor_measured else "")
        + " own (1e6 / whole µs); with front ends, projected for a K-core node as "
        "min(1e6 / engine µs, (K − 1) · 1e6 / front-end µs).",
        "",
        "| model | processes | engine µs | front ends µs | whole µs "
        + ("| × floor " if floor_measured else "") + "| req/s measured "
        + "".join(f"| ceiling, {k} cores " for k in cores)
        + "|",
        "|---|---|---:|---:|---:" + "|---:" * floor_measured + "|---:"
        + "|---:" * len(cores) + "|",
    ]  # fmt: skip
    for entry in sweep["ceilings"]:
        us = entry["cpu_us_per_request"]
        multiple = entry.get("x_floor")
        if entry["frontends"] in ONE_PROCESS:
            limits = [f"{entry['ceiling']:,} (one process)" if entry.get("ceiling") else "–"]
            limits *= len(cores)
        else:
            projected = entry.get("projected", {})
            limits = [f"{projected[str(k)]:,}" if str(k) in projected else "–" for k in cores]
        out.append(
            f"| {entry['model']} | {_configuration(entry['frontends'])} "
            f"| {_us(us.get('engine'))} | {_us(us.get('frontends'))} | {_us(us['whole'])} "
            + (f"| {'–' if multiple is None else f'{multiple:.2f}'} " if floor_measured else "")
            + f"| {entry['req_per_s']:.0f} | " + " | ".join(limits) + " |"
        )
    out.append("")
    for model in models:
        out += [
            f"#### {model}: requests/s and latency",
            "",
            "| c | processes | clients | req/s | × single | × 1 front end "
            + ("| × baseline " if base else "") + "| p50 ms "
            "| p50 − single ms | p99 ms | batch | server cores | CPU µs/req by role |",
            "|---:|---|---:|---:|---:|---:" + "|---:" * bool(base)
            + "|---:|---:|---:|---:|---:|---|",
        ]  # fmt: skip
        for row in (r for r in rows if r["model"] == model):
            c = row["concurrency"]
            single = _find(rows, model, 0, c)
            one = _find(rows, model, 1, c)
            baseline = _find(rows, model, BASELINE, c)
            p50_delta = (
                f"{row['p50_ms'] - single['p50_ms']:+.2f}" if single and row["frontends"] else "–"
            )
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_us_per_request"].items())
            out.append(
                f"| {c} | {_configuration(row['frontends'])} | {row['clients']} "
                f"| {row['req_per_s']:.0f} "
                f"| {_ratio(row['req_per_s'], single['req_per_s']) if single else '–'} "
                f"| {_ratio(row['req_per_s'], one['req_per_s']) if one else '–'} "
                + (f"| {_ratio(row['req_per_s'], baseline['req_per_s']) if baseline else '–'} "
                   if base else "")
                + f"| {row['p50_ms']:.2f} | {p50_delta} | {row['p99_ms']:.2f} "
                f"| {row['batch_mean'] or '–'} | {row['server_cores']} | {cpu} |"
                + (f" errors {row['errors']}" if row["errors"] else "")
                + (
                    f" {row['processes_replaced']} process(es) ended"
                    if row["processes_replaced"]
                    else ""
                )
            )
        out.append("")
    out += _summary(rows, models)
    return out


def _summary(rows: list[dict[str, Any]], models: list[str]) -> list[str]:
    """The ratios named in one line each: 2 front ends / 1 and best split / single (and /
    the baseline) per level, the p50 cost of a front end at concurrency 1 (and its p50
    against the baseline's), and (with the floor) each configuration's whole CPU per
    request over the floor's at `cpu_concurrency`."""
    lines = []
    at = cpu_concurrency(rows)
    levels = sorted({r["concurrency"] for r in rows})
    for model in models:
        parts = []
        for c in levels:
            single, one, two, base = (_find(rows, model, n, c) for n in (0, 1, 2, BASELINE))
            split_rows = [
                r
                for r in rows
                if r["model"] == model and r["concurrency"] == c and r["frontends"] > 0
            ]
            best = max(split_rows, key=lambda r: r["req_per_s"], default=None)
            text = f"c={c}:"
            if best and single:
                text += (
                    f" best split ({_configuration(best['frontends'])}) / single "
                    f"{_ratio(best['req_per_s'], single['req_per_s'])}"
                )
            if best and base:
                text += f", best split / baseline {_ratio(best['req_per_s'], base['req_per_s'])}"
            if two and one:
                text += f", 2 front ends / 1 {_ratio(two['req_per_s'], one['req_per_s'])}"
            if c == 1 and single and one:
                text += f", p50 1 front end − single {one['p50_ms'] - single['p50_ms']:+.2f} ms"
            if c == 1 and base and one:
                text += f", p50 1 front end − baseline {one['p50_ms'] - base['p50_ms']:+.2f} ms"
            parts.append(text)
        lines.append(f"- {model} req/s: " + "; ".join(parts) + ".")
        multiples = [
            f"{_configuration(r['frontends'])} {multiple:.2f}"
            for r in rows
            if r["model"] == model and r["concurrency"] == at and r["frontends"] != FLOOR
            if (multiple := x_floor(rows, r)) is not None
        ]
        if multiples:
            lines.append(
                f"- {model} whole CPU per request / the floor's, c={at}: "
                + ", ".join(multiples)
                + "."
            )
        over = _over_split_floor(rows, model, at)
        if over:
            lines.append(f"- {model} CPU µs per request over the split floor's, c={at}: {over}.")
    return [*lines, ""]


def _over_split_floor(rows: list[dict[str, Any]], model: str, at: int) -> str:
    """Each front-end count's engine and front ends over the split floor's echo engine and
    front end: what the server's own code costs per request, by role."""
    bottom = _find(rows, model, SPLIT_FLOOR, at)
    if bottom is None:
        return ""
    base = bottom["cpu_us_per_request"]  # a split's rows and this one have both roles
    return "; ".join(
        f"{_configuration(row['frontends'])}: "
        f"engine {row['cpu_us_per_request']['engine'] - base['engine']:+.0f}, "
        f"front ends {row['cpu_us_per_request']['frontends'] - base['frontends']:+.0f}"
        for row in rows
        if row["model"] == model and row["concurrency"] == at and row["frontends"] > 0
    )
