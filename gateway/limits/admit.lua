-- Admissions, with what rides along (gateway/limits/redis_backend.py documents the formats).
-- KEYS[1]: the config change token. ARGV[1]: settlements to apply first; ARGV[2]: SETs to apply
-- ("key value ttl" lines); ARGV[3]: admissions, JSON [[head, [spec, spec...], [key to GET...]], ...].
-- Returns {token or nil, settle alerts, then per admission: its reply, then its reads' values}.
local settled = settle(ARGV[1])
write(ARGV[2])
local function ints(list)
  for k, v in ipairs(list) do list[k] = string.format('%d', v) end
  return table.concat(list, ',')
end

local function admit(h, specs)
  local prefix, minute, now = h[1], h[2], h[3]
  local est_t, est_m = h[4], h[5]
  local lease, lease_ttl = h[6], h[7]
  local minute_ttl, grace = h[8], h[9]
  local n = #specs
  local scopes, missing = {}, {}
  for i = 1, n do
    local f = specs[i]
    local s = {base = prefix .. f[1] .. ':', rpm = f[2], tpm = f[3], conc = f[4], bt = f[5], bm = f[6]}
    scopes[i] = s
    if s.bt >= 0 or s.bm >= 0 then
      s.bk = s.base .. 'b:' .. f[7]
      local row = redis.call('HMGET', s.bk, 'st', 'sm', 'rt', 'rm')
      if not row[1] then
        local seed_t, seed_m = f[9], f[10]
        if seed_t < 0 then
          missing[#missing + 1] = i - 1
        else
          redis.call('HSET', s.bk, 'st', seed_t, 'sm', seed_m, 'rt', 0, 'rm', 0)
          redis.call('EXPIRE', s.bk, math.max(f[8] - math.floor(now / 1000), 0) + grace)
          row = {seed_t, seed_m, 0, 0}
        end
      end
      s.st, s.sm, s.rt, s.rm = tonumber(row[1]), tonumber(row[2]), tonumber(row[3]), tonumber(row[4])
    end
  end
  if #missing > 0 then
    return '2||' .. ints(missing) .. '|'
  end
  local counts, fails, alerts = {}, {}, {}
  for i = 1, n do
    local s = scopes[i]
    local r, t = 0, 0
    if s.rpm >= 0 or s.tpm >= 0 then
      s.mk = s.base .. 'm:' .. minute
      local row = redis.call('HMGET', s.mk, 'r', 't')
      s.fresh = not row[1]
      r, t = tonumber(row[1]) or 0, tonumber(row[2]) or 0
      if s.rpm >= 0 and r + 1 > s.rpm then fails[#fails + 1] = i - 1; fails[#fails + 1] = 0 end
      if s.tpm >= 0 and t + est_t > s.tpm then fails[#fails + 1] = i - 1; fails[#fails + 1] = 1 end
    end
    counts[#counts + 1] = r
    counts[#counts + 1] = t
    if s.conc >= 0 then
      s.ck = s.base .. 'c'
      local held = redis.call('ZCARD', s.ck)
      if held >= s.conc then
        redis.call('ZREMRANGEBYSCORE', s.ck, '-inf', now)
        held = redis.call('ZCARD', s.ck)
      end
      if held >= s.conc then fails[#fails + 1] = i - 1; fails[#fails + 1] = 2 end
    end
    if s.bk and ((s.bt >= 0 and s.st + s.rt + est_t > s.bt) or (s.bm >= 0 and s.sm + s.rm + est_m > s.bm)) then
      fails[#fails + 1] = i - 1
      fails[#fails + 1] = 3
      if redis.call('HSETNX', s.bk, 'ah', 1) == 1 then
        alerts[#alerts + 1] = i - 1; alerts[#alerts + 1] = 2; alerts[#alerts + 1] = s.st; alerts[#alerts + 1] = s.sm
      end
    end
  end
  if #fails > 0 then
    return '0|' .. ints(counts) .. '|' .. ints(fails) .. '|' .. ints(alerts)
  end
  for i = 1, n do
    local s = scopes[i]
    if s.mk then
      counts[2 * i - 1] = counts[2 * i - 1] + 1
      counts[2 * i] = counts[2 * i] + est_t
      redis.call('HSET', s.mk, 'r', counts[2 * i - 1], 't', counts[2 * i])
      if s.fresh then redis.call('EXPIRE', s.mk, minute_ttl) end
    end
    if s.ck then
      redis.call('ZADD', s.ck, now + lease_ttl, lease)
      redis.call('PEXPIRE', s.ck, lease_ttl)
    end
    if s.bk then
      redis.call('HSET', s.bk, 'rt', s.rt + est_t, 'rm', s.rm + est_m)
    end
  end
  return '1|' .. ints(counts) .. '||'
end

local out = {redis.call('GET', KEYS[1]), settled}
for _, a in ipairs(cjson.decode(ARGV[3])) do
  out[#out + 1] = admit(a[1], a[2])
  for _, key in ipairs(a[3]) do out[#out + 1] = redis.call('GET', key) end
end
return out
