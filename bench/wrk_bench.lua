-- wrk script of the benchmark harness (bench/run.py): POST one Responses API body, print a JSON summary.
--
-- Environment:
--   WRK_BODY       the request body (JSON text); default a small non-streaming request
--   WRK_AUTH       one bearer key sent with every request
--   WRK_KEYS_FILE  instead of WRK_AUTH: a file of bearer keys, one per line; each request picks one
--                  by a Zipf law over the line order (line 1 is the most used key)
--   WRK_ZIPF_S     the Zipf exponent (default 1.1)
--   WRK_KEYS_ORDER "turn": use the keys of WRK_KEYS_FILE in turn instead (thread i starts at line i
--                  and steps by WRK_THREADS, default 2: every key is used before any is used again)
--   WRK_KEYS_FROM  with WRK_KEYS_ORDER=turn: skip this many lines first (to go on where a run stopped)
--   WRK_EXPECT     a status every answer must have: the answers without it are counted and printed
--                  as "UNEXPECTED {json}" (only then does wrk call Lua for every answer)
--
-- The last line printed is "BENCH {json}" with the request count, duration, error counts and latency
-- percentiles in microseconds; bench/run.py parses it.

local body = os.getenv("WRK_BODY") or '{"model":"gpt-4.1","input":"Say hello to the benchmark."}'
local auth = os.getenv("WRK_AUTH")
local keys_file = os.getenv("WRK_KEYS_FILE")
local zipf_s = tonumber(os.getenv("WRK_ZIPF_S") or "1.1")
local in_turn = os.getenv("WRK_KEYS_ORDER") == "turn"
local turn_step = tonumber(os.getenv("WRK_THREADS") or "2") -- wrk -t: how many threads share the file
local keys_from = tonumber(os.getenv("WRK_KEYS_FROM") or "0")
local expect = tonumber(os.getenv("WRK_EXPECT") or "")

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if auth then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

local threads_started = 0
local threads = {}

function setup(thread)
  -- A distinct seed per thread: every thread would otherwise draw the same key sequence.
  threads_started = threads_started + 1
  thread:set("thread_seed", threads_started)
  table.insert(threads, thread)
end

unexpected = 0
if expect then
  function response(status, headers, body)
    if status ~= expect then
      unexpected = unexpected + 1
    end
  end
end

if keys_file then
  -- Only defined for the key mix: a request() function makes wrk call Lua for every request, which
  -- is slower than its static request, so the other scenarios leave it out.
  local prepared = {} -- rank -> the whole HTTP request with that key, formatted once
  local cdf = {} -- rank -> P(rank' <= rank)
  local count = 0

  function init(args)
    for line in io.lines(keys_file) do
      if #line > 0 then
        count = count + 1
        local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. line }
        prepared[count] = wrk.format("POST", wrk.path, headers, body)
      end
    end
    local total = 0
    for rank = 1, count do
      total = total + 1 / rank ^ zipf_s
      cdf[rank] = total
    end
    for rank = 1, count do
      cdf[rank] = cdf[rank] / total
    end
    math.randomseed(os.time() * 1000 + (thread_seed or 0))
    position = (thread_seed or 1) - 1 + keys_from
  end

  position = 0

  function request()
    if in_turn then
      position = position % count + 1
      local chosen = prepared[position]
      position = position + turn_step - 1
      return chosen
    end
    -- Inverse CDF by binary search: the first rank whose cumulative probability reaches u.
    local u = math.random()
    local lo, hi = 1, count
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then
        lo = mid + 1
      else
        hi = mid
      end
    end
    return prepared[lo]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
  if expect then
    local bad = 0
    for _, thread in ipairs(threads) do
      bad = bad + (thread:get("unexpected") or 0)
    end
    io.write(string.format('UNEXPECTED {"count":%d}\n', bad))
  end
end
