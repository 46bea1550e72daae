"""The split floor (`bench.floor --split`): a real floor process and its echo engine, every
call answered through a shared-memory slot and the engine channel, the segment private
while it runs and gone once it stops."""

from __future__ import annotations

import stat
from pathlib import Path

from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc

from bench import floor, frontend, frontends, null_model
from bench.repository import Served
from bench.serving import start
from server import shm
from server.repository import MODEL_FILE, ModelConfig, latest_version


def test_the_split_floor_answers_through_its_echo_engine(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    null_model.build(repo)
    config = ModelConfig.load(repo / null_model.NAME)
    served = Served(null_model.NAME, config, latest_version(repo / null_model.NAME) / MODEL_FILE)
    request = frontend.request_for(served)
    server = start(repo, tmp_path / "floor.log", ["--split"], command=floor.COMMAND)
    try:
        tree = frontends.process_tree(server.process.pid)
        assert sorted(p.comm for p in tree.values()) == [floor.ECHO_ENGINE, floor.SPLIT_FRONTEND]
        assert frontends.roles_of(tree) == {"engine": 1, "frontends": 1, "other": 0}
        (segment,) = shm.SHM_DIR.glob(f"{shm.PREFIX}{server.process.pid}.*")
        assert stat.S_IMODE(segment.stat().st_mode) == 0o600
        with server.channel() as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(50):
                response = stub.ModelInfer(request, timeout=30)
                assert response.model_name == null_model.NAME and response.raw_output_contents
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=null_model.NAME))
        assert stats.model_stats[0].inference_stats.success.count == 50
    finally:
        assert server.stop() == 0
    assert not segment.exists()
    assert frontends.process_tree(server.process.pid) == {}
    echo = next(p for p in tree.values() if p.comm == floor.ECHO_ENGINE)
    assert not Path(f"/proc/{echo.pid}").exists() or _zombie(echo.pid)


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
