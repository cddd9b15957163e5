-- Functions shared by admit.lua and settle.lua (each is sent prefixed with this file).

-- SETs with an expiry: "key value ttl" lines (keys and values without blanks).
local function write(text)
  for key, value, ttl in string.gmatch(text, '(%S+) (%S+) (%d+)') do
    redis.call('SET', key, value, 'EX', ttl)
  end
end

-- Settlements: JSON [prefix, op, op...] (gateway/limits/redis_backend.py); returns the alerts that fired.
local function reached(st, sm, limit_t, limit_m)
  return (limit_t >= 0 and st >= limit_t) or (limit_m >= 0 and sm >= limit_m)
end
local function settle(text)
  if text == nil or text == '' then return '' end
  local ops = cjson.decode(text)
  local prefix = ops[1]
  local alerts = {}
  for i = 2, #ops do
    local f = ops[i]
    local base = prefix .. f[1] .. ':'
    local rd, td = f[4], f[5]
    if rd ~= 0 or td ~= 0 then
      local mk = base .. 'm:' .. f[2]
      local row = redis.call('HMGET', mk, 'r', 't')
      if row[1] then
        redis.call('HSET', mk, 'r', math.max(tonumber(row[1]) + rd, 0), 't', math.max(tonumber(row[2]) + td, 0))
      end
    end
    if f[6] ~= '-' then redis.call('ZREM', base .. 'c', f[6]) end
    if f[7] == 1 then
      local bk = base .. 'b:' .. f[3]
      local row = redis.call('HMGET', bk, 'st', 'sm', 'rt', 'rm')
      if row[1] then
        local st, sm = tonumber(row[1]) + f[10], tonumber(row[2]) + f[11]
        local rt, rm = math.max(tonumber(row[3]) + f[8], 0), math.max(tonumber(row[4]) + f[9], 0)
        redis.call('HSET', bk, 'st', st, 'sm', sm, 'rt', rt, 'rm', rm)
        if reached(st, sm, f[12], f[13]) and redis.call('HSETNX', bk, 'as', 1) == 1 then
          alerts[#alerts + 1] = string.format('%d,1,%d,%d', i - 2, st, sm)
        end
        if reached(st, sm, f[14], f[15]) and redis.call('HSETNX', bk, 'ah', 1) == 1 then
          alerts[#alerts + 1] = string.format('%d,2,%d,%d', i - 2, st, sm)
        end
      end
    end
  end
  return table.concat(alerts, ',')
end
