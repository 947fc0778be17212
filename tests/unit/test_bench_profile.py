"""bench/profile_serve.py charges each py-spy sample to the part of `pulse serve` whose thread it came from."""

from __future__ import annotations

from bench.profile_serve import by_part


def test_samples_are_charged_by_thread_entry_point_api_worker_threads_included(tmp_path):
    folded = tmp_path / "p.folded"
    folded.write_text(
        "\n".join(
            [
                "process 1;thread (2);Thread._bootstrap (threading.py:1);Consumer.run (pulse/infra/consumer.py:9) 5",
                "process 1;thread (3);Relay.run (pulse/infra/relay_cdc.py:9) 2",
                "process 4;thread (4);Server.run (uvicorn/server.py:1);HotRoutes.__call__ (pulse/api/hot.py:1) 2",
                # a sync handler, on anyio's thread pool, and a hot route's, on the API's hop: the API's too
                "process 4;thread (5);WorkerThread.run (anyio/_backends/_asyncio.py:1);get_order (x.py:1) 1",
                "process 4;thread (6);Hop._work (pulse/api/hot.py:1);create_order (x.py:1) 1",
            ]
        )
    )
    assert by_part(folded) == {"consumers": 45.5, "API": 36.4, "relay": 18.2}
