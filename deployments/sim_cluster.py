"""A multi-node Ray cluster simulated on one machine, private to the calling process (tests, benchmarks).

Built on Ray's own test utilities: :class:`ray.cluster_utils.Cluster` runs one raylet per "node"
(each with its own CPUs and custom resources); with ``autoscale_node_types`` the head also runs
Ray's autoscaler with the fake multi-node provider (what ``ray.cluster_utils.AutoscalingCluster``
configures), which starts and stops worker raylets on this machine as pending actors or placement
groups need them and as nodes stay idle.

Isolation from other Ray users of the machine: ``AutoscalingCluster.start()`` runs ``ray stop
--force`` (it would kill every Ray on the machine), so it is not used; instead the cluster gets its
own temporary directory (``RAY_TMPDIR``: sessions and the ``ray_current_cluster`` file that a bare
``ray.init()`` reads) and a free GCS port, and :meth:`SimCluster.shutdown` ends only the processes
this cluster started (its nodes' processes and the autoscaler's fake nodes, by process id). Call it
from a process of its own: ``RAY_TMPDIR`` and the autoscaler variables are set in ``os.environ``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Optional

FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True}


def autoscaler_config(head_resources: dict, node_types: dict, gcs_address: str,
                      idle_timeout_minutes: float, max_workers: int) -> dict:
    """The fake multi-node autoscaler config (Ray's ``fake_multi_node/example.yaml`` shape).

    ``node_types``: name -> ``{"resources": {...}, "min_workers": m, "max_workers": n}``."""
    types = {name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in node_types.items()}
    types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    return {"cluster_name": "eeserve-sim", "max_workers": max_workers,
            "provider": {**FAKE_PROVIDER, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}


class SimCluster:
    """Head node (+ fixed worker nodes with :meth:`add_node`, + autoscaled fake nodes).

    Args:
        head_cpus, head_resources: the head node's CPUs and custom resources.
        autoscale_node_types: worker node types for the autoscaler (None: no autoscaler).
        idle_timeout_s: how long an autoscaled node stays idle before the autoscaler removes it.
        object_store_bytes: object store of each node (small: the model is not shipped through it).
    """

    def __init__(self, head_cpus: float = 1, head_resources: Optional[dict] = None,
                 autoscale_node_types: Optional[dict] = None, idle_timeout_s: float = 15.0,
                 max_workers: int = 4, object_store_bytes: int = 80 * 1024 * 1024):
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
        from ray.cluster_utils import Cluster

        from deployments.testing import free_port

        self.tmp = tempfile.mkdtemp(prefix="eesim-", dir="/tmp")  # short: raylet socket paths
        os.environ["RAY_TMPDIR"] = self.tmp
        self.object_store_bytes = object_store_bytes
        port = free_port()
        import ray._private.services as services

        ip = services.get_node_ip_address()
        head_args = dict(num_cpus=head_cpus, resources=dict(head_resources or {}), gcs_server_port=port,
                         include_dashboard=False, object_store_memory=object_store_bytes)
        if autoscale_node_types:
            cfg = autoscaler_config(dict(head_resources or {}, CPU=head_cpus), autoscale_node_types,
                                    f"{ip}:{port}", idle_timeout_s / 60.0, max_workers)
            path = os.path.join(self.tmp, "autoscaler.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
            head_args["autoscaling_config"] = path
            # the fake provider knows the head by this node id (as AutoscalingCluster's v2 set-up does):
            # without it the autoscaler drops the head's load reports and never launches a node
            head_env = {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID}
        else:
            head_env = {}
        os.environ.update(head_env)
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        finally:
            for k in head_env:  # fixed worker nodes and fake nodes get ids of their own
                os.environ.pop(k, None)
        self.address = self.cluster.address

    def add_node(self, num_cpus: float = 1, resources: Optional[dict] = None):
        """A fixed worker node (a raylet) with its own CPUs and custom resources; returns the node."""
        return self.cluster.add_node(num_cpus=num_cpus, resources=dict(resources or {}),
                                     object_store_memory=self.object_store_bytes)

    def remove_node(self, node, allow_graceful: bool = False) -> None:
        """Kill a worker node's processes (as when a machine is lost: ``allow_graceful=False``)."""
        self.cluster.remove_node(node, allow_graceful=allow_graceful)

    def node_of(self, node_id: str):
        """The fixed worker node (``Node``) whose Ray node id is ``node_id``, or None."""
        return next((n for n in self.cluster.worker_nodes if n.node_id == node_id), None)

    def connect(self):
        import ray

        ray.init(address=self.address, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        return ray

    @staticmethod
    def alive_nodes() -> list[dict]:
        """The alive nodes: ``{"node_id", "resources", "is_head"}`` each."""
        import ray

        return [{"node_id": n["NodeID"], "resources": n["Resources"],
                 "is_head": bool(n["Resources"].get("node:__internal_head__"))}
                for n in ray.nodes() if n["Alive"]]

    def shutdown(self) -> None:
        """Serve and the driver off, then every process of this cluster, by id, then its temp dir."""
        import psutil
        import ray

        me = psutil.Process()
        mine = {p.pid for p in me.children(recursive=True)}  # nodes, autoscaler, its fake nodes, workers
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        try:
            self.cluster.shutdown()
        except Exception:
            pass
        procs = []
        for pid in mine:
            try:
                p = psutil.Process(pid)
                p.kill()
                procs.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        time.sleep(0.2)
        shutil.rmtree(self.tmp, ignore_errors=True)
