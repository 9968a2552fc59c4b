"""The driver-neutral model: requests, instances, decisions and per-request records."""

from sagesched.core.assignment import Assignment, Decision, RejectCode, Rejection
from sagesched.core.instance import InstanceKind, InstanceView
from sagesched.core.queue import GatewayQueue
from sagesched.core.records import RECORD_COLUMNS, Outcome, RequestRecord
from sagesched.core.request import NO_SLO, SLO, Priority, Request, RequestType

__all__ = [
    "NO_SLO",
    "RECORD_COLUMNS",
    "SLO",
    "Assignment",
    "Decision",
    "GatewayQueue",
    "InstanceKind",
    "InstanceView",
    "Outcome",
    "Priority",
    "RejectCode",
    "Rejection",
    "Request",
    "RequestRecord",
    "RequestType",
]
