-- Category ids for names, adding the new ones in order.
-- KEYS: category index hash (name -> id), categories list (names by id), in {items}
-- ARGV: names (never '')
-- Returns one id per name.
local out = {}
for k, c in ipairs(ARGV) do
  local ci = redis.call('HGET', KEYS[1], c)
  if not ci then
    ci = redis.call('RPUSH', KEYS[2], c) - 1
    redis.call('HSET', KEYS[1], c, ci)
  end
  out[k] = tonumber(ci)
end
return out
