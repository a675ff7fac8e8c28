"""Shared pieces of the Celery and Dramatiq peer benchmarks.

The work is the same as Warren's benchmark: N persistent jobs, each carrying the ~150-byte JSON
payload of job_payload.py, submitted with publisher confirms, handled by a no-op task that
counts itself, and acked after the handler ran.

Counting: every handler call appends one fixed-width record, ``"%08d %017.6f\\n"`` (job id, wall
clock when the handler ran), to a count file opened with O_APPEND. A write of 27 bytes to a local
file with O_APPEND is atomic, so handlers in several processes or threads can share it. The bench
process polls the file's size for progress and, at the end, reads it to check that every job id in
0..N-1 was handled exactly once. The last record's time is the moment the last handler ran.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import psutil

AMQP_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
MANAGEMENT_URL = os.environ.get("WARREN_MANAGEMENT_URL", "http://127.0.0.1:15672")
MANAGEMENT_USER = os.environ.get("WARREN_MANAGEMENT_USER", "guest")
MANAGEMENT_PASSWORD = os.environ.get("WARREN_MANAGEMENT_PASSWORD", "guest")
VHOST = "/"

RECORD_SIZE = 27  # len(b"%08d %017.6f\n" % (0, time.time()))
RSS_INTERVAL_S = 0.05
HERE = os.path.dirname(os.path.abspath(__file__))


def unique_queue(system: str) -> str:
    return f"peer-{system}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# Handler side: the count file.

_count_fd = None
_count_pid = None
_count_lock = threading.Lock()


def record_handled(job_id: int) -> None:
    """Called by the no-op task in the worker: append one record to $PEER_COUNT_FILE."""
    global _count_fd, _count_pid
    pid = os.getpid()
    if _count_pid != pid:  # first call in this process (or a forked child): open our own fd
        with _count_lock:
            if _count_pid != pid:
                _count_fd = os.open(
                    os.environ["PEER_COUNT_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
                )
                _count_pid = pid
    os.write(_count_fd, b"%08d %017.6f\n" % (job_id, time.time()))


def handled_count(path: str) -> int:
    try:
        return os.stat(path).st_size // RECORD_SIZE
    except FileNotFoundError:
        return 0


def read_records(path: str) -> list[tuple[int, float]]:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) % RECORD_SIZE:
        raise RuntimeError(f"count file {path} has a torn record ({len(data)} bytes)")
    out = []
    for off in range(0, len(data), RECORD_SIZE):
        rec = data[off : off + RECORD_SIZE]
        out.append((int(rec[:8]), float(rec[9:26])))
    return out


def verify_records(path: str, jobs: int) -> tuple[float, float, float]:
    """Check every job 0..jobs-1 was handled exactly once; return the first and last handler
    times and the longest pause between two consecutive handler runs (a stall detector)."""
    records = read_records(path)
    seen = [0] * jobs
    for job_id, _ in records:
        if not 0 <= job_id < jobs:
            raise RuntimeError(f"handler saw unknown job id {job_id}")
        seen[job_id] += 1
    missing = [i for i, c in enumerate(seen) if c == 0]
    dup = [i for i, c in enumerate(seen) if c > 1]
    if missing or dup or len(records) != jobs:
        raise RuntimeError(
            f"count mismatch: {len(records)} records for {jobs} jobs, "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(dup)} run twice (e.g. {dup[:5]})"
        )
    times = sorted(t for _, t in records)
    max_gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    return times[0], times[-1], max_gap


def wait_handled(path: str, jobs: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        n = handled_count(path)
        if n >= jobs:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} after {n}/{jobs} handled")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s with {n}/{jobs} handled")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Management API (its queue figures are sampled: they lag by up to collect_statistics_interval,
# 5 s by default, so they are only used to confirm a settled state, never to time anything).


def _mgmt(method: str, path: str):
    req = urllib.request.Request(MANAGEMENT_URL.rstrip("/") + path, method=method)
    token = base64.b64encode(f"{MANAGEMENT_USER}:{MANAGEMENT_PASSWORD}".encode()).decode()
    req.add_header("Authorization", "Basic " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            return json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _vq(name: str) -> str:
    return urllib.parse.quote(VHOST, safe="") + "/" + urllib.parse.quote(name, safe="")


def mgmt_queue(name: str):
    return _mgmt("GET", "/api/queues/" + _vq(name))


def mgmt_queue_type(name: str) -> str:
    q = mgmt_queue(name)
    return q.get("type", "unknown") if q else "missing"


def mgmt_exchange(name: str):
    return _mgmt("GET", "/api/exchanges/" + _vq(name))


def mgmt_delete_queue(name: str) -> None:
    _mgmt("DELETE", "/api/queues/" + _vq(name))


def mgmt_delete_exchange(name: str) -> None:
    _mgmt("DELETE", "/api/exchanges/" + _vq(name))


MGMT_SAMPLE_MS = int(os.environ.get("WARREN_MGMT_SAMPLE_MS", "5000"))  # collect_statistics_interval


def wait_queue_settled(name: str, expect_ready: int = 0, after: float | None = None,
                       timeout_s: float = 40.0) -> dict:
    """Wait until the management API shows `expect_ready` ready and 0 unacked messages in a
    statistics sample taken after the wall-clock time `after` (the API labels each sample with the
    end of its collection interval, so a label at least one interval past `after` is needed)."""
    deadline = time.monotonic() + timeout_s
    last = None
    path = ("/api/queues/" + _vq(name) + f"?lengths_age={2 * MGMT_SAMPLE_MS // 1000}"
            f"&lengths_incr={MGMT_SAMPLE_MS // 1000}")
    while True:
        q = _mgmt("GET", path)
        if q is not None:
            ready, unacked = q.get("messages_ready"), q.get("messages_unacknowledged")
            samples = (q.get("messages_ready_details") or {}).get("samples") or []
            newest = max((s["timestamp"] for s in samples), default=0)
            fresh = after is None or newest - MGMT_SAMPLE_MS >= after * 1000
            last = (ready, unacked, newest)
            if fresh and (ready, unacked) == (expect_ready, 0):
                return q
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"queue {name} did not settle at {expect_ready} ready / 0 unacked; last seen "
                f"(ready, unacked, sample time) = {last}, wanted a sample after {after}"
            )
        time.sleep(0.25)


def wait_consumers(probe, minimum: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until the queue has `minimum` consumers. `probe()` -> (ready, consumers), live."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, consumers = probe()
        if consumers >= minimum:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before consuming")
        if time.monotonic() > deadline:
            raise RuntimeError("worker did not start consuming in time")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The worker process and its memory.


class RssSampler:
    """Samples the RSS of a process and its descendants every 50 ms on a thread."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.window_peak = 0
        self.window_breakdown: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> tuple[int, dict]:
        total, parts = 0, {}
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            total += rss
            parts[p.pid] = rss
        return total, parts

    def _run(self):
        while not self._stop.is_set():
            total, parts = self._sample()
            with self._lock:
                if total > self.window_peak:
                    self.window_peak = total
                    self.window_breakdown = parts
            self._stop.wait(RSS_INTERVAL_S)

    def reset_window(self) -> None:
        with self._lock:
            self.window_peak, self.window_breakdown = 0, {}

    def take_window(self) -> tuple[int, list[int]]:
        """Peak tree RSS since the last reset, and the per-process RSS at that peak."""
        total, parts = self._sample()
        with self._lock:
            if total > self.window_peak:
                self.window_peak, self.window_breakdown = total, parts
            return self.window_peak, sorted(self.window_breakdown.values(), reverse=True)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def start_worker(argv: list[str], env: dict, log_path: str) -> subprocess.Popen:
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        argv, env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    return proc


def stop_worker(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (a warm shutdown for both Celery and Dramatiq), then SIGKILL the group if stuck."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Any child left in the worker's own session (a pool process) goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")
    except FileNotFoundError:
        return ""


def emit(out_path: str | None, record: dict) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(line + "\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The measurements, shared by both systems. An adapter (celery_bench.CeleryPeer,
# dramatiq_bench.DramatiqPeer) supplies the system-specific parts:
#   system, version, pool, queue_type_asked, notes (list of str)
#   open(queue) -> declares the queue (with its companions) from the bench process
#   submit_all(queue, n)  -> submits jobs 0..n-1, each one confirmed before the call returns
#   probe(queue) -> (ready, consumers), live, over AMQP (passive declare)
#   worker_argv(queue) -> argv; worker_env(queue, count_file) -> env
#   close(queue) -> deletes the queue and whatever the system declared for it


def _record(adapter, measure, jobs, seconds, queue, peak_rss=None, extra=None, notes=None):
    rec = {
        "system": adapter.system,
        "version": adapter.version,
        "measure": measure,
        "jobs": jobs,
        "seconds": round(seconds, 6) if seconds is not None else None,
        "jobs_per_s": round(jobs / seconds, 1) if seconds else None,
        "queue_type": mgmt_queue_type(queue),
        "pool": adapter.pool,
        "peak_rss_bytes": peak_rss,
        "notes": "; ".join(list(adapter.notes) + (notes or [])),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        rec.update(extra)
    return rec


def _drain_timeout(jobs: int) -> float:
    return 120.0 + jobs / 100.0


def _finish_worker(adapter, queue, proc, sampler, count_file, jobs):
    """After the count reached `jobs`: verify, settle, stop, re-check.
    Returns (first handler time, last handler time, longest gap, peak RSS, RSS by process)."""
    first, last, max_gap = verify_records(count_file, jobs)
    # Management API, in a sample taken after the last handler ran: 0 ready, 0 unacked, while the
    # worker still runs (so an ack it never sent would show as unacked).
    wait_queue_settled(queue, 0, after=last)
    peak, parts = sampler.take_window()
    stop_worker(proc)
    sampler.stop()
    # Live re-check once the worker is gone: anything it had left unacked is back to ready now.
    ready, consumers = adapter.probe(queue)
    if ready != 0:
        raise RuntimeError(f"{ready} messages back in {queue} after the worker stopped")
    if handled_count(count_file) != jobs:
        raise RuntimeError(f"{handled_count(count_file)} handler runs after stop, expected {jobs}")
    return first, last, max_gap, peak, parts


def run_fill_and_drain(adapter, queue, jobs, workdir, out, want_enqueue, want_drain):
    count_file = os.path.join(workdir, queue + ".count")
    log_file = os.path.join(workdir, queue + ".worker.log")
    adapter.open(queue)
    try:
        log(f"{adapter.system}: submitting {jobs} jobs to {queue}")
        t0 = time.perf_counter()
        adapter.submit_all(queue, jobs)
        enqueue_s = time.perf_counter() - t0
        ready, _ = adapter.probe(queue)
        if ready != jobs:
            raise RuntimeError(f"{ready} ready in {queue} after submitting {jobs}")
        if want_enqueue:
            emit(out, _record(adapter, "enqueue", jobs, enqueue_s, queue,
                              notes=["one publisher, each publish awaited its confirm"]))
        if not want_drain:
            return
        log(f"{adapter.system}: starting one worker on {jobs} ready jobs ({adapter.pool})")
        t_spawn = time.time()
        proc = start_worker(adapter.worker_argv(queue), adapter.worker_env(queue, count_file),
                            log_file)
        sampler = RssSampler(proc.pid)
        try:
            wait_handled(count_file, jobs, proc, _drain_timeout(jobs))
            first, last, max_gap, peak, parts = _finish_worker(adapter, queue, proc, sampler,
                                                               count_file, jobs)
        except BaseException:
            stop_worker(proc)
            sampler.stop()
            log("worker log tail:\n" + tail(log_file))
            raise
        seconds = last - first
        emit(out, _record(
            adapter, "drain", jobs, seconds, queue, peak,
            extra={"seconds_incl_startup": round(last - t_spawn, 6),
                   "max_handler_gap_s": round(max_gap, 6), "peak_rss_by_process": parts},
            notes=["seconds = first to last handler run (worker start-up excluded; "
                   "seconds_incl_startup counts from process spawn)",
                   "peak_rss_bytes = peak RSS summed over the worker's process tree while "
                   "draining (shared pages counted once per process)"]))
    finally:
        adapter.close(queue)


def run_e2e(adapter, queue, jobs, workdir, out, idle_secs=2.0):
    count_file = os.path.join(workdir, queue + ".count")
    log_file = os.path.join(workdir, queue + ".worker.log")
    adapter.open(queue)
    try:
        proc = start_worker(adapter.worker_argv(queue), adapter.worker_env(queue, count_file),
                            log_file)
        sampler = RssSampler(proc.pid)
        try:
            wait_consumers(lambda: adapter.probe(queue), 1, proc)
            # Let start-up finish, then measure the idle worker on its empty queue.
            time.sleep(1.0)
            sampler.reset_window()
            time.sleep(idle_secs)
            idle_peak, idle_parts = sampler.take_window()
            sampler.reset_window()
            log(f"{adapter.system}: end to end, {jobs} jobs through {queue} ({adapter.pool})")
            t0 = time.time()
            adapter.submit_all(queue, jobs)
            submitted = time.time() - t0
            wait_handled(count_file, jobs, proc, _drain_timeout(jobs))
            first, last, max_gap, peak, parts = _finish_worker(adapter, queue, proc, sampler,
                                                               count_file, jobs)
        except BaseException:
            stop_worker(proc)
            sampler.stop()
            log("worker log tail:\n" + tail(log_file))
            raise
        emit(out, _record(
            adapter, "idle-rss", 0, None, queue, idle_peak,
            extra={"peak_rss_by_process": idle_parts},
            notes=[f"peak RSS of the worker's process tree over {idle_secs:.0f} s idle on an "
                   "empty queue, after start-up"]))
        emit(out, _record(
            adapter, "e2e", jobs, last - t0, queue, peak,
            extra={"submit_seconds": round(submitted, 6), "max_handler_gap_s": round(max_gap, 6),
                   "peak_rss_by_process": parts},
            notes=["seconds = first submit to last handler run, worker already consuming; "
                   "peak_rss_bytes = worker process tree while it ran"]))
    finally:
        adapter.close(queue)


def add_common_args(parser) -> None:
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--phase", default="all",
                        help="enqueue, drain, e2e, or a comma list; all = enqueue,drain,e2e "
                             "(enqueue and drain share one filled queue)")
    parser.add_argument("--queue", default=None,
                        help="queue name (default: peer-SYSTEM-RANDOM); e2e uses NAME-e2e")
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--json", dest="out", default=None,
                        help="append one JSON object per measurement to this file")
    parser.add_argument("--workdir", default=None,
                        help="folder for count files and worker logs (default: a temp folder)")


def run_cli(adapter, args) -> int:
    import tempfile

    phases = {"enqueue", "drain", "e2e"} if args.phase == "all" else set(args.phase.split(","))
    unknown = phases - {"enqueue", "drain", "e2e"}
    if unknown:
        raise SystemExit(f"unknown phase(s): {', '.join(sorted(unknown))}")
    if args.jobs < 1 or args.jobs > 99_999_999:
        raise SystemExit("--jobs must be 1..99,999,999")
    queue = args.queue or unique_queue(adapter.system)
    workdir = args.workdir or tempfile.mkdtemp(prefix="peer-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        if phases & {"enqueue", "drain"}:
            run_fill_and_drain(adapter, queue, args.jobs, workdir, args.out,
                               "enqueue" in phases, "drain" in phases)
        if "e2e" in phases:
            run_e2e(adapter, queue + "-e2e" if phases != {"e2e"} else queue, args.jobs, workdir,
                    args.out)
    except Exception as e:
        log(f"{adapter.system}: FAILED: {e} (count files and worker logs kept in {workdir})")
        return 1
    finally:
        adapter.shutdown()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
