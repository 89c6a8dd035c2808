"""Scale-out on Ray Serve: the same app (``create_app``) as a Ray Serve deployment, one native
engine per replica, replicas placed by Ray on the machines of its cluster and reached through
Ray Serve's HTTP proxy.

``kvcrush-ov serve --ray --replicas N`` joins the cluster named by ``RAY_ADDRESS`` (or starts a
local one) and blocks until SIGTERM / SIGINT. docs/serving.md shows multi-node use.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def build_deployment(make_pipeline: Callable[[], object], served_name: str,
                     api_key: str | None, replicas: int):
    """A bound Ray Serve application: ``replicas`` copies of the app, each building its own
    Pipeline with ``make_pipeline`` on its replica."""
    from ray import serve

    from kvcrush_ov.server.app import create_app

    def build_app():
        return create_app(make_pipeline(), served_name, api_key)

    cls = serve.ingress(build_app)()
    return serve.deployment(cls, name="kvcrush-ov", num_replicas=replicas,
                            ray_actor_options={"num_cpus": 0}).bind()


def run(make_pipeline: Callable[[], object], served_name: str, api_key: str | None,
        replicas: int, host: str, port: int, log=print) -> int:
    import ray
    from ray import serve

    ray.init(address=None, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False)
    stop = threading.Event()  # set by SIGTERM / SIGINT, also while the replicas start
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_deployment(make_pipeline, served_name, api_key, replicas),
                  name="kvcrush-ov", route_prefix="/")
        if not stop.is_set():
            log(f"[serve] {served_name} on Ray Serve, {replicas} replicas, "
                f"http://{host}:{port}/v1", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
