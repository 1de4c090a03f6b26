"""A multi-node Ray cluster on this machine, driven line by line over stdin.

`python ray_cluster_script.py WORKER_NODES [--dashboard]` starts a head node
(1 CPU; with the dashboard, which takes jobs, on a free port of 127.0.0.1)
and WORKER_NODES worker nodes (1 CPU each) on 127.0.0.1 with Ray's
`cluster_utils.Cluster`, prints `{"address": ..., "nodes": [...]}` and then
answers one line per command (`cluster: ` and JSON):

    remove   kill the newest worker node's processes at once (a lost machine)
    add      start one more worker node
    exit     shut the cluster down

Run as its own process so that the test process never imports Ray, and so
that the environment variable that keeps Ray on loopback is set before Ray
is imported.
"""

from __future__ import annotations

import json
import os
import socket
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from atoll.launch.ray_backend import HEALTH_CHECKS  # noqa: E402

NODE_ARGS = dict(num_cpus=1, object_store_memory=96 * 1024 * 1024, node_ip_address="127.0.0.1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ids() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


ANSWER = "cluster: "  # Ray may print lines of its own on stdout too


def answer(**fields) -> None:
    # One write with its newline: Ray's own processes share this stdout, and a newline
    # written apart lets their output run into the answer.
    sys.stdout.write(ANSWER + json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    workers, dashboard = int(sys.argv[1]), "--dashboard" in sys.argv
    head_args = dict(NODE_ARGS, _system_config=dict(HEALTH_CHECKS), include_dashboard=dashboard,
                     dashboard_host="127.0.0.1", dashboard_port=free_port())
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        added = [cluster.add_node(**NODE_ARGS) for _ in range(workers)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
        info = {"address": cluster.address, "nodes": node_ids()}
        if dashboard:
            info["dashboard"] = f"http://{cluster.head_node.address_info['webui_url']}"
        answer(**info)
        for line in sys.stdin:
            command = line.strip()
            if command == "remove":
                node = added.pop()
                cluster.remove_node(node, allow_graceful=False)
                answer(removed=node.node_id)
            elif command == "add":
                node = cluster.add_node(**NODE_ARGS)
                added.append(node)
                answer(added=node.node_id)
            elif command == "exit":
                break
            else:
                answer(error=f"unknown command {command!r}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
