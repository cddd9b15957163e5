-- Deletes the half-open trial lock KEYS[1] only if ARGV[1] (this owner's token) still holds it:
-- it may have expired and been taken by another replica since. Returns 1 if deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
