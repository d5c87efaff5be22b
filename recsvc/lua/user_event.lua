-- Fold a batch of one user's events into their state; mirrors
-- features.state.apply_user_event operation for operation, event by event.
-- Returns one 1 (applied) or 0 (duplicate event id) per event.
-- Reads and computes first, writes last (dedupe keys after the state), so a
-- script error can never mark an event as seen without applying it.
-- KEYS: state hash, recent zset, purchased set, then one dedupe key per event
--       (all in the user's {u:<id>} slot)
-- ARGV: dedupe_ttl, user_ttl, recent_max, category_half_life, n_half_lives,
--       half_life..., category_weight x4, then per event:
--       type, ts, item, category, price, dedupe (1/0)
local h, r, p = KEYS[1], KEYS[2], KEYS[3]
local dedupe_ttl = tonumber(ARGV[1])
local user_ttl = tonumber(ARGV[2])
local recent_max = tonumber(ARGV[3])
local cat_hl = tonumber(ARGV[4])
local nh = tonumber(ARGV[5])
local hls, cws = {}, {}
for j = 1, nh do hls[j] = tonumber(ARGV[5 + j]) end
for j = 0, 3 do cws[j] = tonumber(ARGV[6 + nh + j]) end
local first_event = 10 + nh
local nc = 4 * nh

local flat = redis.call('HGETALL', h)
local s, aff = {}, {}
for j = 1, #flat, 2 do
  local f = flat[j]
  if string.sub(f, 1, 2) == 'a:' then aff[string.sub(f, 3)] = tonumber(flat[j + 1])
  else s[f] = flat[j + 1] end
end
local n = tonumber(s['n'] or '0')
local ref = tonumber(s['ref'] or '0')
local lt = tonumber(s['lt'] or '0')
local lp = tonumber(s['lp'] or '0')
local ps = tonumber(s['ps'] or '0')
local pn = tonumber(s['pn'] or '0')
local counts = {}
for k = 0, nc - 1 do counts[k] = tonumber(s['c' .. k] or '0') end

local applied = {}
local changed = false
local ev = 0
local seen_now = {}
local recent_adds, purchases, dedupe_keys = {}, {}, {}
for a = first_event, #ARGV, 6 do
  ev = ev + 1
  local t = tonumber(ARGV[a])
  local ts = tonumber(ARGV[a + 1])
  local item, cat = ARGV[a + 2], ARGV[a + 3]
  local price = tonumber(ARGV[a + 4])
  local fresh = true
  if ARGV[a + 5] == '1' and dedupe_ttl > 0 then
    local dk = KEYS[3 + ev]
    fresh = not seen_now[dk] and redis.call('EXISTS', dk) == 0
    if fresh then
      seen_now[dk] = true
      dedupe_keys[#dedupe_keys + 1] = dk
    end
  end
  if fresh then
    changed = true
    if n == 0 then ref = ts end
    if ts > ref then
      for hi = 0, nh - 1 do
        local f = 2 ^ (-(ts - ref) / hls[hi + 1])
        for k = hi, nc - 1, nh do counts[k] = counts[k] * f end
      end
      local fc = 2 ^ (-(ts - ref) / cat_hl)
      for c, v in pairs(aff) do aff[c] = v * fc end
      ref = ts
    end
    for hi = 0, nh - 1 do
      local k = t * nh + hi
      counts[k] = counts[k] + 2 ^ (-(ref - ts) / hls[hi + 1])
    end
    if cat ~= '' then
      aff[cat] = (aff[cat] or 0.0) + cws[t] * 2 ^ (-(ref - ts) / cat_hl)
    end
    if ts > lt then lt = ts end
    if t == 3 then
      if ts > lp then lp = ts end
      purchases[#purchases + 1] = item
    end
    if price > 0 then
      ps = ps + price
      pn = pn + 1
    end
    n = n + 1
    recent_adds[#recent_adds + 1] = {ts, item}
    applied[ev] = 1
  else
    applied[ev] = 0
  end
end

if changed then
  local function fmt(v) return string.format('%.17g', v) end
  local out = {'n', tostring(n), 'ref', fmt(ref), 'lt', fmt(lt), 'lp', fmt(lp),
               'ps', fmt(ps), 'pn', tostring(pn)}
  for k = 0, nc - 1 do
    out[#out + 1] = 'c' .. k
    out[#out + 1] = fmt(counts[k])
  end
  for c, v in pairs(aff) do
    out[#out + 1] = 'a:' .. c
    out[#out + 1] = fmt(v)
  end
  -- In bounded chunks: unpack() of an unbounded table can fail.
  for j = 1, #out, 400 do
    redis.call('HSET', h, unpack(out, j, math.min(j + 399, #out)))
  end
  -- Per event, in order, as features.state trims after each event.
  for _, add in ipairs(recent_adds) do
    redis.call('ZADD', r, 'GT', add[1], add[2])
    redis.call('ZREMRANGEBYRANK', r, 0, -(recent_max + 1))
  end
  for _, item in ipairs(purchases) do redis.call('SADD', p, item) end
  for _, dk in ipairs(dedupe_keys) do redis.call('SET', dk, '1', 'EX', dedupe_ttl) end
  if user_ttl > 0 then
    redis.call('EXPIRE', h, user_ttl)
    redis.call('EXPIRE', r, user_ttl)
    if redis.call('EXISTS', p) == 1 then redis.call('EXPIRE', p, user_ttl) end
  end
end
return applied
