#!/usr/bin/env python3
"""Process jobs from a Warren queue with a plain AMQP 0-9-1 client (pika), as docs/PROTOCOL.md
describes: per-consumer prefetch, decode, run the handler, then settle:

- done: ack;
- retryable failure with attempts left: publish a copy with x-warren-attempt + 1 to the delay
  route (warren.delay.21), wait for the confirm, ack;
- permanent failure, attempts exhausted, malformed message, unknown kind: publish a copy with
  the x-warren-error* headers to warren.dead / <queue>.dead, wait for the confirm, ack;
- the copy could not be published: reject with requeue (the broker redelivers it).

Kinds: `echo` (done, result = payload) and `fail` ({"times": N}: a retryable failure while the
attempt is at most N, then done; {"permanent": true}: a permanent failure), like warren-worker.

    python_worker.py --queue emails [--max-jobs N] [--prefetch 16]

The broker is taken from $WARREN_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f). The
queue must exist (`warren topology apply --queue NAME`). The retry policy flags default to
[queues.default.retry] of config/warren.toml.
"""

import argparse
import datetime
import json
import os
import random
import socket
import sys
import time

import pika
import pika.exceptions

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
JOBS_EXCHANGE = "warren.jobs"
DEAD_EXCHANGE = "warren.dead"
DELAY_LEVELS = 22
DELAY_EXCHANGE = f"warren.delay.{DELAY_LEVELS - 1:02d}"  # warren.delay.21
MAX_DELAY_SECONDS = 2**DELAY_LEVELS - 1
# The only headers a copy carries over (PROTOCOL.md §5), each if a number or a short string.
CARRIED_HEADERS = ("x-warren-first-enqueued-at", "traceparent", "tracestate", "baggage")
MAX_CARRIED_VALUE_BYTES = 1024
MAX_ERROR_BYTES = 2048


class Malformed(Exception):
    """The message is not a Warren job; retrying cannot help."""


class Retry(Exception):
    """A later attempt may succeed."""


class Permanent(Exception):
    """No attempt can succeed."""


def log(text: str) -> None:
    print(text, flush=True)


def rfc3339_now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Decoding (PROTOCOL.md, "Consuming a job")


def decode(props: pika.BasicProperties, body: bytes, max_payload_bytes: int):
    """Returns (job_id, kind, attempt, payload) or raises Malformed, in Warren's order of checks."""
    if not props.message_id:
        raise Malformed("message has no message_id property (the job id)")
    if not props.type:
        raise Malformed("message has no type property (the job kind)")
    if props.content_type is not None and props.content_type.lower() != "application/json":
        raise Malformed(f"content type `{props.content_type}` is not application/json")
    if len(body) > max_payload_bytes:
        raise Malformed(
            f"body is {len(body)} bytes, over the limit of {max_payload_bytes} "
            "(jobs.max_payload_bytes)"
        )
    attempt = (props.headers or {}).get("x-warren-attempt", 1)
    # pika decodes AMQP booleans to bool, a subclass of int: not an attempt number.
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= 2**32 - 1:
        raise Malformed(f"header x-warren-attempt is {attempt!r}, not a whole number from 1 up")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=refuse)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Malformed(f"body is not valid JSON: {err}") from None
    return props.message_id, props.type, attempt, payload


# ---------------------------------------------------------------------------------------------
# Handlers


def echo(payload, attempt):
    return payload


def fail(payload, attempt):
    if not isinstance(payload, dict):
        payload = {}
    if payload.get("permanent") is True:
        raise Permanent("failing for good, as the payload asked")
    times = payload.get("times")
    if isinstance(times, bool) or not isinstance(times, int) or times < 0:
        raise Permanent('fail wants a payload like {"times": 2} or {"permanent": true}')
    if attempt <= times:
        raise Retry(f"failing attempt {attempt} of the first {times}, as asked")
    return {"succeeded_on_attempt": attempt}


HANDLERS = {"echo": echo, "fail": fail}


# ---------------------------------------------------------------------------------------------
# Retry schedule and delay route (PROTOCOL.md, "Retrying a job")


def delay_after(args, attempt: int) -> float:
    """Seconds to wait after attempt `attempt` failed: exponential, capped, then jittered."""
    base = min(args.initial_delay * args.multiplier ** (attempt - 1), args.max_delay)
    return random.uniform(base * (1 - args.jitter), base * (1 + args.jitter))


def whole_seconds(delay: float) -> int:
    """Rounded to the nearest second (half up), at least 1 for any non-zero delay, capped."""
    if delay <= 0:
        return 0
    millis = int(delay * 1000)
    return max(1, min((millis + 500) // 1000, MAX_DELAY_SECONDS))


def delay_routing_key(seconds: int, queue: str) -> str:
    """22 words `0`/`1`, the bits of `seconds`, most significant first, then the queue name."""
    bits = [str((seconds >> level) & 1) for level in range(DELAY_LEVELS - 1, -1, -1)]
    return ".".join(bits + [queue])


def copy_properties(props, headers: dict, own_user: str) -> pika.BasicProperties:
    """The delivered message's properties with new headers, persistent, without `user_id` (the
    broker refuses one that is not this connection's user, and closes the channel) and without
    `expiration` (it would cut a delay short or drop a dead letter), as Warren's workers do."""
    del own_user  # kept in the signature for callers; Warren drops user_id unconditionally
    return pika.BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.type,
        app_id=props.app_id,
        cluster_id=props.cluster_id,
    )


def carried_headers(props: pika.BasicProperties) -> dict:
    """The allow-listed headers of the delivery, never CC/BCC, x-death or forged x-warren-*."""
    carried = {}
    for key in CARRIED_HEADERS:
        value = (props.headers or {}).get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) or (isinstance(value, str) and len(value.encode()) <= MAX_CARRIED_VALUE_BYTES):
            carried[key] = value
    return carried


def capped(text: str, limit: int = MAX_ERROR_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, saying how much was left out."""
    data = text.encode()
    if len(data) <= limit:
        return text
    note_room = len(f"… ({len(data)} more bytes)".encode())
    kept = data[: max(0, limit - note_room)].decode("utf-8", "ignore")
    return f"{kept}… ({len(data) - len(kept.encode())} more bytes)"


# ---------------------------------------------------------------------------------------------
# The worker


class Worker:
    def __init__(self, args):
        self.args = args
        self.queue = args.queue
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        url = os.environ.get("WARREN_AMQP_URL", DEFAULT_URL)
        self.user = pika.URLParameters(url).credentials.username
        # Two connections, as warren-worker does: the broker blocks publishing connections under
        # a resource alarm, and consuming (acking) must go on then.
        self.consuming = self._connect(url, "consume")
        self.publishing = self._connect(url, "publish")
        self.consumer = self.consuming.channel()
        # Per-consumer prefetch (global=False): quorum queues refuse global QoS.
        self.consumer.basic_qos(prefetch_count=args.prefetch, global_qos=False)
        self.publisher = self.publishing.channel()
        self.publisher.confirm_delivery()

    def _connect(self, url: str, role: str) -> pika.BlockingConnection:
        params = pika.URLParameters(url)
        params.client_properties = {
            "connection_name": f"warren-python-worker {socket.gethostname()}:{os.getpid()} {role}"
        }
        return pika.BlockingConnection(params)

    def run(self) -> int:
        log(f"worker {self.worker_id} consuming `{self.queue}` (prefetch {self.args.prefetch})")
        done = 0
        idle_since = time.monotonic()
        for method, props, body in self.consumer.consume(self.queue, inactivity_timeout=0.5):
            if method is None:
                if self.args.idle_exit and time.monotonic() - idle_since > self.args.idle_exit:
                    log(f"no job for {self.args.idle_exit}s, exiting")
                    break
                continue
            self.process(method, props, body)
            done += 1
            idle_since = time.monotonic()
            if self.args.max_jobs and done >= self.args.max_jobs:
                break
        # Prefetched but unprocessed deliveries are handed back (basic.nack requeue).
        self.consumer.cancel()
        self.consuming.close()
        self.publishing.close()
        log(f"stopped after {done} job(s)")
        return 0

    def process(self, method, props, body) -> None:
        tag = method.delivery_tag
        try:
            job_id, kind, attempt, payload = decode(props, body, self.args.max_payload_bytes)
        except Malformed as err:
            log(f"malformed message on `{self.queue}`: {err}; dead-lettering it")
            self.dead_letter(tag, props, body, "malformed", str(err), attempts=0)
            return
        desc = f"job {job_id} kind={kind} attempt={attempt}"
        handler = HANDLERS.get(kind)
        if handler is None:
            reason = f"no handler for kind `{kind}` (this worker knows: {', '.join(sorted(HANDLERS))})"
            log(f"{desc}: {reason}; dead-lettering it")
            self.dead_letter(tag, props, body, "unknown-kind", reason, attempts=attempt)
            return
        try:
            result = handler(payload, attempt)
        except Permanent as err:
            log(f"{desc}: permanent failure: {err}; dead-lettering it")
            self.dead_letter(tag, props, body, "permanent", str(err), attempts=attempt)
            return
        except Exception as err:  # Retry, or any bug in a handler: retryable
            self.retry_or_give_up(tag, props, body, desc, attempt, str(err))
            return
        self.consumer.basic_ack(tag)
        log(f"{desc}: done, result {json.dumps(result)}")

    def retry_or_give_up(self, tag, props, body, desc, attempt, error) -> None:
        if attempt >= self.args.max_attempts:
            reason = f"gave up after {attempt} attempts; last error: {error}"
            log(f"{desc}: {reason}; dead-lettering it")
            self.dead_letter(tag, props, body, "exhausted", reason, attempts=attempt)
            return
        seconds = whole_seconds(delay_after(self.args, attempt))
        if seconds == 0:
            exchange, key = JOBS_EXCHANGE, self.queue
        else:
            exchange, key = DELAY_EXCHANGE, delay_routing_key(seconds, self.queue)
        headers = carried_headers(props)
        headers["x-warren-attempt"] = attempt + 1
        if self.publish_then_ack(tag, exchange, key, body, copy_properties(props, headers, self.user)):
            log(
                f"{desc}: failed ({error}); retry scheduled in {seconds}s as attempt "
                f"{attempt + 1} via {exchange} key {key}"
            )

    def dead_letter(self, tag, props, body, error_class, error, attempts) -> None:
        headers = carried_headers(props)
        headers.update(
            {
                "x-warren-error": capped(error),
                "x-warren-error-class": error_class,
                "x-warren-attempts": attempts,
                "x-warren-failed-at": rfc3339_now(),
                "x-warren-worker": self.worker_id,
                "x-warren-queue": self.queue,
            }
        )
        key = f"{self.queue}.dead"
        if self.publish_then_ack(tag, DEAD_EXCHANGE, key, body, copy_properties(props, headers, self.user)):
            log(f"  -> dead-lettered to {DEAD_EXCHANGE} key {key} (class {error_class})")

    def publish_then_ack(self, tag, exchange, key, body, properties) -> bool:
        """Publishes the replacement (mandatory, confirmed); acks the delivery only then."""
        try:
            self.publisher.basic_publish(exchange, key, body, properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as err:
            log(f"  could not queue the copy on {exchange} [{key}]: {err!r}; requeueing")
            self.consumer.basic_reject(tag, requeue=True)
            return False
        except pika.exceptions.ChannelClosed as err:
            # The publishing channel is gone (e.g. 404: exchange missing). Hand the delivery
            # back and open a fresh confirm channel for the next job.
            log(f"  publishing channel closed ({err!r}); requeueing and reopening it")
            self.consumer.basic_reject(tag, requeue=True)
            self.publisher = self.publishing.channel()
            self.publisher.confirm_delivery()
            return False
        self.consumer.basic_ack(tag)
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description="Process Warren jobs over plain AMQP.")
    parser.add_argument("--queue", required=True, help="work queue to consume")
    parser.add_argument("--max-jobs", type=int, default=0, help="exit after N deliveries (0: never)")
    parser.add_argument("--idle-exit", type=float, default=0, help="exit after S seconds with no job")
    parser.add_argument("--prefetch", type=int, default=16, help="per-consumer prefetch")
    parser.add_argument("--max-payload-bytes", type=int, default=1048576)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--initial-delay", type=float, default=1.0, help="seconds")
    parser.add_argument("--multiplier", type=float, default=2.0)
    parser.add_argument("--max-delay", type=float, default=3600.0, help="seconds")
    parser.add_argument("--jitter", type=float, default=0.2)
    args = parser.parse_args()
    if args.max_jobs:
        # Do not take more than we will process: handing deliveries back counts as a return
        # toward the queue's x-delivery-limit.
        args.prefetch = min(args.prefetch, args.max_jobs)
    try:
        worker = Worker(args)
    except pika.exceptions.AMQPError as err:
        print(f"python_worker: cannot connect to the broker: {err!r}", file=sys.stderr)
        return 4
    try:
        return worker.run()
    except pika.exceptions.ChannelClosedByBroker as err:
        print(f"python_worker: {err.reply_code} {err.reply_text}", file=sys.stderr)
        return 3 if err.reply_code == 404 else 4
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
