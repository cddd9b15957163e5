-- wrk script: POST a small Responses API request.
-- Usage: wrk -t2 -c16 -d5s -s bench/wrk_post.lua http://127.0.0.1:PORT/v1/responses
-- Environment: WRK_STREAM=1 for "stream": true, WRK_TOKENS=N to ask the fake upstream for N tokens,
-- WRK_MODEL (default gpt-4.1), WRK_AUTH (sent as "Authorization: Bearer <WRK_AUTH>").
local stream = os.getenv("WRK_STREAM") == "1"
local model = os.getenv("WRK_MODEL") or "gpt-4.1"
local tokens = os.getenv("WRK_TOKENS")
local auth = os.getenv("WRK_AUTH")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if auth then
  wrk.headers["Authorization"] = "Bearer " .. auth
end
if tokens then
  wrk.headers["x-fake-tokens"] = tokens
end
wrk.body = '{"model":"' .. model .. '","input":"Say hello to the benchmark.","stream":'
  .. (stream and "true" or "false") .. '}'

-- Report failures so a misconfigured run is obvious (no response() hook: it would slow wrk down).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("non-2xx/3xx: %d, socket errors: connect %d read %d write %d timeout %d\n",
    e.status, e.connect, e.read, e.write, e.timeout))
end
