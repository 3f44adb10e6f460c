"""The node provider of the local rehearsal cluster (``cluster/local.sh start --like aws``).

Ray's fake multi-node provider starts every simulated node in the head's session directory, so all
nodes share one ``runtime_resources`` directory. A node that installs a job's ``working_dir`` for
the first time replaces the package directory there, and the job driver on the head, which runs
inside that directory, loses its working directory (``FileNotFoundError`` from ``os.getcwd()`` in
Tune). On a real cluster every node has its own disk; this provider gives every simulated node its
own ``runtime_resources_<node>`` directory to match. Loaded by the autoscaler on the head (the
config's ``provider.module``); imports Ray's autoscaler internals, so nothing else imports it.
"""
from __future__ import annotations

import ray._private.parameter as ray_parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class RehearsalNodeProvider(FakeMultiNodeProvider):
    """:class:`FakeMultiNodeProvider` with one runtime-resources directory per simulated node."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:
            own_dir = f"runtime_resources_node{self._next_node_id + 1}"
            base = ray_parameter.RayParams

            class _NodeParams(base):
                def __init__(self, *args, **kwargs):
                    kwargs.setdefault("runtime_env_dir_name", own_dir)
                    super().__init__(*args, **kwargs)

            # The base method builds the node's RayParams through this module attribute.
            ray_parameter.RayParams = _NodeParams
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray_parameter.RayParams = base
