#!/usr/bin/env python3
"""Celery peer benchmark: enqueue, drain and end to end on RabbitMQ, same work as Warren's.

    celery_bench.py --jobs N [--phase enqueue|drain|e2e|all] [--queue NAME] [--json OUT]
                    [--queue-type quorum|classic] [--pool prefork|solo|threads|gevent]
                    [--concurrency C] [--prefetch-multiplier M]

Submitting: task.apply_async() per job from one process, broker_transport_options
confirm_publish=True (py-amqp waits for each confirm), persistent delivery. Worker: one
`celery worker` process (with its pool's children), task_acks_late=True, default WARNING log level,
--without-gossip --without-mingle --without-heartbeat (no worker events traffic).
Run it with the bench virtualenv's python (bench/peers/setup.sh).
"""

from __future__ import annotations

import argparse
import os
import sys

import amqp
import celery
import kombu

import job_payload
import peer_common
from celery_tasks import TASK_NAME, make_app

DELAYED_LEVELS = 28  # kombu.transport.native_delayed_delivery: celery_delayed_0..27


class CeleryPeer:
    system = "celery"

    def __init__(self, args):
        self.queue_type = args.queue_type
        self.pool_name = args.pool
        self.concurrency = 1 if args.pool == "solo" else args.concurrency
        self.prefetch_multiplier = args.prefetch_multiplier
        self.version = f"celery {celery.__version__} (kombu {kombu.__version__}, py-amqp {amqp.__version__})"
        prefetch = self.prefetch_multiplier * self.concurrency
        self.pool = f"{self.pool_name} -c {self.concurrency}, prefetch {prefetch}"
        self.notes = [
            "task_acks_late=True, confirm_publish=True, persistent",
            f"worker_prefetch_multiplier={self.prefetch_multiplier}",
        ]
        if self.queue_type == "quorum":
            self.notes.append("quorum queue via task_queues queue_arguments; Celery detects it "
                              "(worker_detect_quorum_queues) and uses per-consumer QoS")
        self.app = None
        self._probe_conn = None
        # Celery's worker declares native-delayed-delivery queues/exchanges (celery_delayed_0..27,
        # quorum) when it sees a quorum queue; remove them at the end unless they were there before.
        self._delayed_preexisting = peer_common.mgmt_queue("celery_delayed_0") is not None
        # The worker's remote control (on by default) declares the fanout exchange celery.pidbox.
        self._pidbox_preexisting = peer_common.mgmt_exchange("celery.pidbox") is not None
        self._delayed_created = False

    # -- bench side ------------------------------------------------------------------------
    def open(self, queue):
        self.app = make_app(queue, self.queue_type, self.prefetch_multiplier)
        with self.app.producer_or_acquire() as producer:  # also opens the producer connection
            self.app.amqp.queues[queue].bind(producer.channel).declare()

    def submit_all(self, queue, jobs):
        task = self.app.tasks[TASK_NAME]
        payload = job_payload.payload
        for i in range(jobs):
            task.apply_async((payload(i),))

    def probe(self, queue):
        for attempt in (1, 2):
            try:
                if self._probe_conn is None:
                    self._probe_conn = kombu.Connection(peer_common.AMQP_URL)
                ok = self._probe_conn.default_channel.queue_declare(queue=queue, passive=True)
                return ok.message_count, ok.consumer_count
            except Exception:
                self._drop_probe()
                if attempt == 2:
                    raise

    def _drop_probe(self):
        if self._probe_conn is not None:
            try:
                self._probe_conn.release()
            except Exception:
                pass
            self._probe_conn = None

    def close(self, queue):
        if self.queue_type == "quorum" and self.app is not None:
            self._delayed_created = True
        peer_common.mgmt_delete_queue(queue)
        peer_common.mgmt_delete_exchange(queue)  # the direct exchange Celery routes through
        if self.app is not None:
            self.app.close()
            self.app = None

    def shutdown(self):
        self._drop_probe()
        if self._delayed_created and not self._delayed_preexisting:
            for level in range(DELAYED_LEVELS):
                peer_common.mgmt_delete_queue(f"celery_delayed_{level}")
                peer_common.mgmt_delete_exchange(f"celery_delayed_{level}")
            peer_common.mgmt_delete_exchange("celery_delayed_delivery")
        if not self._pidbox_preexisting:
            peer_common.mgmt_delete_exchange("celery.pidbox")

    # -- worker ----------------------------------------------------------------------------
    def worker_argv(self, queue):
        return [
            sys.executable, "-m", "celery", "-A", "celery_tasks", "worker",
            "-Q", queue, "-P", self.pool_name, "-c", str(self.concurrency),
            "-n", f"{queue}@%h", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]

    def worker_env(self, queue, count_file):
        env = dict(os.environ)
        env.update(
            PEER_QUEUE=queue,
            PEER_QUEUE_TYPE=self.queue_type,
            PEER_PREFETCH_MULTIPLIER=str(self.prefetch_multiplier),
            PEER_COUNT_FILE=count_file,
            PYTHONPATH=peer_common.HERE,
        )
        return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peer_common.add_common_args(parser)
    parser.add_argument("--pool", choices=["prefork", "solo", "threads", "gevent"],
                        default="prefork")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="pool size (ignored for solo); default 2 = the machine's cores")
    parser.add_argument("--prefetch-multiplier", type=int, default=4,
                        help="worker_prefetch_multiplier (Celery's default is 4)")
    args = parser.parse_args()
    return peer_common.run_cli(CeleryPeer(args), args)


if __name__ == "__main__":
    sys.exit(main())
