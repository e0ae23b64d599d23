"""The server's whole stack runs in a process where importing tensorflow, keras or tf2onnx
raises ImportError (the blocker of tests/runtime/test_no_tensorflow.py)."""

from __future__ import annotations

from tests.runtime.test_no_tensorflow import assert_ok, run_python


def test_every_serving_module_imports_and_serves_with_tensorflow_blocked(repo):
    proc = run_python(
        """
        import asyncio
        import httpx
        import numpy as np
        import serving, serving.__main__, serving.app, serving.batcher, serving.bench
        import serving.client, serving.codec, serving.metrics, serving.repository
        from serving.app import AppOptions, create_app
        from serving.repository import ServerSettings

        async def go():
            app = create_app(sys.argv[1], ServerSettings(threads=1), AppOptions(poll_interval=0))
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    for _ in range(200):
                        if (await c.get("/v2/health/ready")).status_code == 200:
                            break
                        await asyncio.sleep(0.05)
                    x = np.zeros((1, 10, 4)).tolist()
                    r = await c.post("/v1/models/gru:predict", json={"instances": x})
                    assert r.status_code == 200, r.text
                    assert np.array(r.json()["predictions"]).shape == (1, 3)

        asyncio.run(go())
        """,
        str(repo[0]),
    )
    assert_ok(proc)
