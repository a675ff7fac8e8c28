#!/usr/bin/env python3
"""Dramatiq peer benchmark: enqueue, drain and end to end on RabbitMQ, same work as Warren's.

    dramatiq_bench.py --jobs N [--phase enqueue|drain|e2e|all] [--queue NAME] [--json OUT]
                      [--queue-type quorum|classic] [--threads T]

Submitting: actor.send() per job from one process on RabbitmqBroker(confirm_delivery=True)
(pika waits for each confirm), persistent delivery. Worker: one `dramatiq --processes 1` (a
supervisor process plus one worker process with T threads, default 8), default middleware; its
acks are late (after the actor ran) by design.
quorum: stock Dramatiq cannot declare quorum queues; see dramatiq_tasks.QuorumRabbitmqBroker.
Run it with the bench virtualenv's python (bench/peers/setup.sh).
"""

from __future__ import annotations

import argparse
import os
import sys

import dramatiq
import pika

import job_payload
import peer_common
from dramatiq_tasks import make_broker


class DramatiqPeer:
    system = "dramatiq"

    def __init__(self, args):
        self.queue_type = args.queue_type
        self.threads = args.threads
        self.version = f"dramatiq {dramatiq.__version__} (pika {pika.__version__})"
        self.pool = f"1 process x {self.threads} threads, prefetch {2 * self.threads}"
        self.notes = ["confirm_delivery=True, persistent, acks after the actor ran"]
        if self.queue_type == "quorum":
            self.notes.append(
                "quorum only through a subclass overriding the private "
                "RabbitmqBroker._build_queue_arguments (stock Dramatiq declares classic queues "
                "and fails with PRECONDITION_FAILED on a pre-declared quorum queue)")
        else:
            self.notes.append("stock Dramatiq queues (classic, with .DQ and .XQ companions)")
        self.broker = None
        self.actor = None
        self._probe_conn = None
        self._probe_ch = None

    def open(self, queue):
        if self.broker is not None:
            self.broker.close()
        self.broker, self.actor = make_broker(queue, self.queue_type)
        self.broker.declare_queue(queue, ensure=True)  # Q, Q.DQ, Q.XQ; opens the connection

    def submit_all(self, queue, jobs):
        send = self.actor.send
        payload = job_payload.payload
        for i in range(jobs):
            send(payload(i))

    def probe(self, queue):
        for attempt in (1, 2):
            try:
                if self._probe_ch is None or not self._probe_ch.is_open:
                    if self._probe_conn is None or not self._probe_conn.is_open:
                        self._probe_conn = pika.BlockingConnection(
                            pika.URLParameters(peer_common.AMQP_URL))
                    self._probe_ch = self._probe_conn.channel()
                ok = self._probe_ch.queue_declare(queue, passive=True)
                return ok.method.message_count, ok.method.consumer_count
            except Exception:
                self._probe_ch = None
                if attempt == 2:
                    raise

    def close(self, queue):
        for name in (queue, queue + ".DQ", queue + ".XQ"):
            peer_common.mgmt_delete_queue(name)

    def shutdown(self):
        if self.broker is not None:
            self.broker.close()
        if self._probe_conn is not None and self._probe_conn.is_open:
            self._probe_conn.close()

    def worker_argv(self, queue):
        return [
            sys.executable, "-m", "dramatiq", "dramatiq_tasks",
            "--processes", "1", "--threads", str(self.threads),
            "--queues", queue, "--path", peer_common.HERE,
        ]

    def worker_env(self, queue, count_file):
        env = dict(os.environ)
        env.update(
            PEER_QUEUE=queue,
            PEER_QUEUE_TYPE=self.queue_type,
            PEER_COUNT_FILE=count_file,
            PYTHONPATH=peer_common.HERE,
        )
        return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peer_common.add_common_args(parser)
    parser.add_argument("--threads", type=int, default=8, help="worker threads (Dramatiq default 8)")
    args = parser.parse_args()
    return peer_common.run_cli(DramatiqPeer(args), args)


if __name__ == "__main__":
    sys.exit(main())
