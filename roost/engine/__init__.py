"""The engine: one discrete-event loop in virtual time, with a policy per pacing (see
:mod:`roost.engine.core`)."""

from roost.engine.core import Callback, Engine, History, client_metric_means
from roost.engine.rounds import RoundPlan, plan_round

__all__ = ["Callback", "Engine", "History", "RoundPlan", "client_metric_means", "plan_round"]
