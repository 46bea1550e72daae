"""docs/security.md states the numbers the tests assert, and every setting it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server import engine, errors
from server.config import Settings, env_var
from tests.reliability import catalogue, test_catalogue, test_drain, test_overload, test_soak
from tests.reliability import test_faults as faults
from tests.reliability import test_frontends as frontends
from tests.reliability import test_properties as properties
from tests.reliability import test_replica_faults as replica_faults
from tests.security import test_http_hostile as hostile
from tests.security import test_shared_memory_hostile as shm

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
MIB = 1 << 20


def _text() -> str:
    return " ".join(DOC.read_text().split())  # one line: numbers may wrap


@pytest.mark.parametrize(
    "stated",
    [
        f"A table of {len(catalogue.CASES)} cases",
        f"less than **{test_catalogue.RSS_BOUND // MIB} MiB** above its level after warm-up",
        f"{properties.CASES.max_examples} examples per property",
        f"**{properties.DEADLINE.seconds} s deadline per example**",
        f"{test_catalogue.WIRE.max_examples} examples each",
        f"`max_queue_size` **{test_overload.MAX_QUEUE}** images",
        f"`--max-decode-backlog` **{test_overload.DECODE_BACKLOG}**",
        f"`max_batch_size` {test_overload.MAX_BATCH}",
        f"**{test_overload.BURST_FACTOR}×** that rate for **{test_overload.BURST_SECONDS:g} s**",
        f"full **{test_overload.FULL_BURST_SECONDS:g} s** run",
        f"within **{test_overload.RSS_BURST_BOUND // MIB} MiB** of its level before the burst",
        f"exceeds {test_overload.DECODE_BACKLOG} + {test_overload.MAX_QUEUE} + 2 × "
        f"{test_overload.MAX_BATCH}",
        f"`--grace-period {test_drain.GRACE_SECONDS:g}`",
        f"**{test_soak.FULL_SOAK_SECONDS / 60:g} minutes** of steady load",
        f"**under {test_soak.GROWTH_BOUND:.0%}**",
        f"A catalogue of {len(hostile.CASES)} hostile requests",
        f"`--http-keepalive-timeout {hostile.KEEPALIVE:g}`, "
        f"`--http-body-timeout {hostile.BODY_TIMEOUT:g}`",
        f"`--max-concurrent-calls {hostile.MAX_CALLS}`",
        f"at most **{hostile.MESSAGE_BOUND}** characters",
        f"add at most **{hostile.LOG_LINES}** lines",
        f"**{hostile.STALLED}** connections send their headers",
        f"within **{hostile.STALL_SLOWDOWN * 1000:g} ms** of their usual time",
        f"**{hostile.BOMBS}** gzip bombs",
        f"less than **{hostile.BOMB_CPU_SECONDS:g} s** of the server's CPU",
        f"answers within **{hostile.HEALTH_BOUND * 1000:g} ms** meanwhile",
        f"**{hostile.SLOWLORIS}** connections, half idle",
        f"at most **{hostile.RSS_MULTIPLE}×** the request's size",
        f"**0 failed calls** of at least {replica_faults.BEFORE + replica_faults.AFTER}",
        f"calls with a **{replica_faults.DEADLINE:g} s** deadline",
        f"within **{replica_faults.DEADLINE + replica_faults.DEADLINE_SLACK:g} s**",
        f"call started **{replica_faults.DETECT_BOUND:g} s** or more after the stop",
        f"back at 0 within **{replica_faults.FREED_BOUND:g} s**",
        f"`--shared-memory-regions {shm.MAX_REGIONS}`, `--shared-memory-bytes {shm.MAX_BYTES}`",
        f"`--max-message-bytes {shm.MAX_MESSAGE}` (2 MiB)",
        f"empty, `/` alone, **{shm.MAX_KEY + 1}** bytes and a NUL",
        f"**{shm.MAX_KEY}** bytes is a name",
        f"a region's name is 1 to **{shm.MAX_NAME}** characters",
        f"an input of **{shm.LARGE}** uint8 images ({shm.LARGE * shm.U8_IMAGE:,} bytes",
        f"a read of **{shm.MAX_MESSAGE // shm.U8_IMAGE + 1}** uint8 images "
        f"({(shm.MAX_MESSAGE // shm.U8_IMAGE + 1) * shm.U8_IMAGE:,} bytes)",
        f"the **{shm.MAX_REGIONS + 1}th** region with {shm.MAX_REGIONS} registered",
        f"at most **{test_catalogue.MAX_DETAILS}** characters: a caller's message is cut at "
        f"{errors.MAX_MESSAGE_CHARS}",
        f"`--session-run-timeout {faults.RUN_TIMEOUT:g}`",
        f"within the bound plus **{faults.SLACK:g} s**",
        f"`RssShmem` within **{frontends.SHMEM_SLACK // MIB} MiB** and its RSS within "
        f"**{frontends.RSS_SLACK // MIB} MiB**",
        f"(doubling up to {engine.RESTART_DELAY_MAX:g} s)",
        f"within **{frontends.ENGINE_GONE_BOUND:g} s**, each exits non-zero",
    ],
)
def test_the_asserted_numbers_are_stated(stated: str) -> None:
    assert stated in _text()


def test_every_setting_named_exists() -> None:
    flags = re.findall(r"^\| `--([a-z-]+)` \| `(RESNET_SERVE_[A-Z_]+)", DOC.read_text(), re.M)
    assert len(flags) >= 8
    for flag, env in flags:
        field = flag.removeprefix("no-").replace("-", "_")
        assert field in Settings.model_fields, flag
        assert env.split("=")[0] == env_var(field)
