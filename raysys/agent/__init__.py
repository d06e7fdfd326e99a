"""Simulator, scenarios, policies and evaluation of the rescaling agent (docs/agent.md).

Importing this package registers the gymnasium environment ``raysys/ClusterEnv-v0``.
"""

from raysys.agent import env as _env  # noqa: F401  (registers raysys/ClusterEnv-v0)
