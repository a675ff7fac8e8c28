-- wrk script of bench/http: every request submits one job, POST /v1/queues/{queue}/jobs with a
-- bearer token, over keep-alive connections. The queue and the token come from the environment
-- (WARREN_BENCH_QUEUE, WARREN_HTTP_TOKEN), so the token is on no command line. The job is the
-- benchmark's ~150-byte payload (bench/src/main.rs, `payload`).
--
-- At the end it prints one line, `WRK_RESULT {json}`: requests, duration, 202s (accepted: the
-- broker confirmed the job), every other status by code, socket errors and latency percentiles,
-- summed over wrk's threads (each runs its own Lua state; setup() keeps them to add up).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local queue = os.getenv("WARREN_BENCH_QUEUE")
  local token = os.getenv("WARREN_HTTP_TOKEN")
  if not queue or not token then
    error("set WARREN_BENCH_QUEUE and WARREN_HTTP_TOKEN")
  end
  accepted = 0
  statuses = {}
  local body = '{"kind":"noop","payload":{"user_id":1,"action":"send-welcome-email",'
    .. '"email":"someone@example.com","template":"welcome-v2","locale":"en-GB",'
    .. '"attempt_hint":0,"pad":"xxxxxxxxxxxxxxxx"}}'
  req = wrk.format("POST", "/v1/queues/" .. queue .. "/jobs", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, body)
end

function request()
  return req
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  else
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local total_accepted = 0
  local others = {}
  for _, thread in ipairs(threads) do
    total_accepted = total_accepted + thread:get("accepted")
    for status, count in pairs(thread:get("statuses")) do
      others[status] = (others[status] or 0) + count
    end
  end
  local other_list = {}
  for status, count in pairs(others) do
    table.insert(other_list, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"accepted":%d,"other_statuses":{%s},'
      .. '"socket_errors":%d,"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, total_accepted, table.concat(other_list, ","),
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
