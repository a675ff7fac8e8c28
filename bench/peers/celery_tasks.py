"""The Celery app of the peer benchmark: one no-op task on one queue, shared by the bench process
(which submits) and the worker (`celery -A celery_tasks worker`, configured by environment)."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

import peer_common

TASK_NAME = "peer.noop"


def make_app(queue: str, queue_type: str, prefetch_multiplier: int) -> Celery:
    app = Celery("peer_bench", broker=peer_common.AMQP_URL, set_as_current=False)
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    app.conf.update(
        # The queue, durable, bound as Celery does by default: a direct exchange of the same name
        # (task_default_exchange = the default queue's name), routing key = queue name.
        task_queues=[
            Queue(queue, Exchange(queue, type="direct"), routing_key=queue, durable=True,
                  queue_arguments=arguments)
        ],
        task_default_queue=queue,
        task_default_delivery_mode="persistent",
        # Publisher confirms on submit: py-amqp waits for each publish's confirm.
        broker_transport_options={"confirm_publish": True},
        # Ack after the handler ran.
        task_acks_late=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=prefetch_multiplier,
        # Celery >= 5.5 sees the quorum queue in task_queues and then uses per-consumer QoS
        # (global QoS is unsupported by quorum queues) and sets up native delayed delivery.
        worker_detect_quorum_queues=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
    )

    app.task(name=TASK_NAME)(noop)
    return app


def noop(job):
    """The no-op task: it only counts itself."""
    peer_common.record_handled(job["user_id"])


if os.environ.get("PEER_QUEUE"):  # the worker side: `celery -A celery_tasks worker`
    app = make_app(
        os.environ["PEER_QUEUE"],
        os.environ.get("PEER_QUEUE_TYPE", "quorum"),
        int(os.environ.get("PEER_PREFETCH_MULTIPLIER", "4")),
    )
