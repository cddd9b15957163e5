-- wrk script of the scale scenario (bench/scale.py): each request takes the next key of a file.
--
-- Environment:
--   WRK_BODY       the request body (JSON text)
--   WRK_AUTH       one bearer key for every request (no file)
--   WRK_KEYS_FILE  instead: a file of bearer keys, one per line, used in turn (thread i starts
--                  at line i and steps by the number of threads, so every key is used before any
--                  is used again)
--   WRK_EXPECT     the status every answer must have (default 200)
--
-- Prints "BENCH {json}" (as bench/wrk_bench.lua) and "UNEXPECTED {json}": the answers whose
-- status was not WRK_EXPECT.

local body = os.getenv("WRK_BODY") or '{"model":"gpt-4.1","input":"Say hello."}'
local auth = os.getenv("WRK_AUTH")
local keys_file = os.getenv("WRK_KEYS_FILE")
local expect = tonumber(os.getenv("WRK_EXPECT") or "200")

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if auth then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

local threads = {}
local started = 0

function setup(thread)
  started = started + 1
  thread:set("thread_index", started)
  table.insert(threads, thread)
end

unexpected = 0

if keys_file then
  local prepared = {}
  local count = 0
  local position = 0
  local step = 1

  function init(args)
    for line in io.lines(keys_file) do
      if #line > 0 then
        count = count + 1
        local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. line }
        prepared[count] = wrk.format("POST", wrk.path, headers, body)
      end
    end
    position = (thread_index or 1) - 1
    step = 2
  end

  function request()
    position = position % count + 1
    local chosen = prepared[position]
    position = position + step - 1
    return chosen
  end
end

function response(status, headers, body)
  if status ~= expect then
    unexpected = unexpected + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("unexpected") or 0)
  end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
  io.write(string.format('UNEXPECTED {"count":%d}\n', bad))
end
