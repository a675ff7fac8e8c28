#!/usr/bin/env python3
"""Submit one Warren job with a plain AMQP 0-9-1 client (pika), as docs/PROTOCOL.md describes.

    python_producer.py --queue emails --kind send --payload '{"to": "ada@example.com"}'

The broker is taken from $WARREN_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f).
The job id is printed on stdout once the broker has confirmed the job.

Exit status: 0 submitted; 2 invalid job (nothing sent); 3 the queue, or Warren's topology, does
not exist on the broker; 4 the broker refused the job, or could not be reached.
"""

import argparse
import datetime
import json
import os
import sys
import time
import uuid

import pika
import pika.exceptions

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
JOBS_EXCHANGE = "warren.jobs"
MAX_PAYLOAD_BYTES = 1048576  # jobs.max_payload_bytes in config/warren.toml


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version 7, random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & (2**62 - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def rfc3339_now() -> str:
    """UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z (what Warren writes)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def strict_json(text: str) -> None:
    """Raises ValueError unless `text` is RFC 8259 JSON (Python also accepts NaN/Infinity)."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    json.loads(text, parse_constant=refuse)


def fail(status: int, message: str):
    print(f"python_producer: {message}", file=sys.stderr)
    sys.exit(status)


def main() -> None:
    parser = argparse.ArgumentParser(description="Submit one Warren job over plain AMQP.")
    parser.add_argument("--queue", required=True, help="work queue (the routing key)")
    parser.add_argument("--kind", required=True, help="job kind (AMQP `type` property)")
    parser.add_argument("--payload", default="{}", help="JSON text, sent byte for byte")
    parser.add_argument("--id", help="job id (AMQP `message_id`); a UUIDv7 by default")
    args = parser.parse_args()

    # 1. Check the job before sending anything.
    body = args.payload.encode("utf-8")
    if len(body) > MAX_PAYLOAD_BYTES:
        fail(2, f"payload is {len(body)} bytes, over the limit of {MAX_PAYLOAD_BYTES}")
    try:
        strict_json(args.payload)
    except ValueError as err:
        fail(2, f"payload is not valid JSON: {err}")
    job_id = uuid7() if args.id is None else args.id
    for what, value in (("queue", args.queue), ("kind", args.kind), ("job id", job_id)):
        if not value:
            fail(2, f"{what} is empty")
        if len(value.encode("utf-8")) > 255:
            fail(2, f"{what} is longer than 255 bytes")

    # 2. Connect and put the channel in confirm mode.
    url = os.environ.get("WARREN_AMQP_URL", DEFAULT_URL)
    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": f"warren-python-producer pid={os.getpid()}"}
    if params.blocked_connection_timeout is None:
        # Under a memory/disk alarm the broker blocks publishers: give up instead of hanging.
        params.blocked_connection_timeout = 30
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as err:
        fail(4, f"cannot connect to the broker: {err!r}")
    channel = connection.channel()
    channel.confirm_delivery()

    # 3. Publish: persistent, mandatory, then wait for the broker's confirm.
    properties = pika.BasicProperties(
        message_id=job_id,
        type=args.kind,
        content_type="application/json",
        delivery_mode=2,
        timestamp=int(time.time()),
        app_id="warren-python-producer",
        headers={
            "x-warren-attempt": 1,
            "x-warren-first-enqueued-at": rfc3339_now(),
        },
    )
    try:
        channel.basic_publish(
            exchange=JOBS_EXCHANGE,
            routing_key=args.queue,
            body=body,
            properties=properties,
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        # basic.return (312 NO_ROUTE) before the confirm: nothing is bound for this key.
        fail(
            3,
            f"queue `{args.queue}` does not exist on the broker (nothing is bound to "
            f"`{JOBS_EXCHANGE}` with that routing key); declare it with "
            f"`warren topology apply --queue {args.queue}` or start a worker for it",
        )
    except pika.exceptions.NackError:
        fail(4, "the broker refused the job (basic.nack); it was not queued, submit it again")
    except pika.exceptions.ChannelClosedByBroker as err:
        if err.reply_code == 404:
            fail(
                3,
                f"exchange `{JOBS_EXCHANGE}` does not exist: Warren's topology was never "
                f"declared on this broker (run `warren topology apply`): {err.reply_text}",
            )
        fail(4, f"the broker closed the channel: {err.reply_code} {err.reply_text}")
    except pika.exceptions.AMQPError as err:
        fail(4, f"publishing failed, the job may or may not be queued: {err!r}")

    print(job_id)
    connection.close()


if __name__ == "__main__":
    main()
