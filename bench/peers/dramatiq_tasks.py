"""The Dramatiq broker and actor of the peer benchmark, shared by the bench process (which
submits) and the worker (`dramatiq dramatiq_tasks`, configured by environment)."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import peer_common

ACTOR_NAME = "peer_noop"


class QuorumRabbitmqBroker(RabbitmqBroker):
    """Stock Dramatiq has no option for the queue type: it declares its queue and the queue's .DQ
    (delay) companion with x-dead-letter-* arguments and no x-queue-type, so RabbitMQ makes them
    classic, and a queue pre-declared as quorum fails its declare with PRECONDITION_FAILED. This
    overrides the (private) argument builder to add x-queue-type=quorum to those two queues; the
    .XQ dead-letter queue stays classic."""

    def _build_queue_arguments(self, queue_name):
        arguments = super()._build_queue_arguments(queue_name)
        arguments["x-queue-type"] = "quorum"
        return arguments


def make_broker(queue: str, queue_type: str):
    cls = QuorumRabbitmqBroker if queue_type == "quorum" else RabbitmqBroker
    broker = cls(url=peer_common.AMQP_URL, confirm_delivery=True)

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name=ACTOR_NAME)
    def noop(job):
        peer_common.record_handled(job["user_id"])

    return broker, noop


if os.environ.get("PEER_QUEUE"):  # the worker side: `dramatiq dramatiq_tasks`
    broker, noop = make_broker(os.environ["PEER_QUEUE"], os.environ.get("PEER_QUEUE_TYPE", "quorum"))
    dramatiq.set_broker(broker)
