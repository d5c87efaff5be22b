-- Fold a batch of one user's events into their state; mirrors
-- features.state.apply_user_event operation for operation, event by event.
-- Returns per event {1, partner...} (applied) or {0, partner...} (duplicate
-- event id): the items the event forms co-visitation pairs with, which the
-- item-side script applies. A duplicate returns the partners stored with its
-- dedupe key, so a retry after a lost item-side call still carries its pairs.
-- Reads and computes first, writes last (dedupe keys after the state), so a
-- script error can never mark an event as seen without applying it.
-- KEYS: state hash, recent zset, purchased set, visits zset, then one dedupe
--       key per event (all in the user's {u:<id>} slot)
-- ARGV: dedupe_ttl, user_ttl, recent_max, category_half_life, bucket_secs,
--       bucket_items, keep_secs, n_half_lives, half_life..., category_weight x4,
--       then per event: type, ts, item, category, price, dedupe (1/0)
local h, r, p, v = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dedupe_ttl = tonumber(ARGV[1])
local user_ttl = tonumber(ARGV[2])
local recent_max = tonumber(ARGV[3])
local cat_hl = tonumber(ARGV[4])
local bucket_secs = tonumber(ARGV[5])
local bucket_items = tonumber(ARGV[6])
local keep_secs = tonumber(ARGV[7])
local nh = tonumber(ARGV[8])
local hls, cws = {}, {}
for j = 1, nh do hls[j] = tonumber(ARGV[8 + j]) end
for j = 0, 3 do cws[j] = tonumber(ARGV[9 + nh + j]) end
local first_event = 13 + nh
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

-- Co-visitation buckets touched by this batch: loaded once, written at the end.
-- Mirrors features.state.visit_partners.
local buckets, visit_adds = {}, {}
local function bucket_of(b)
  local bk = buckets[b]
  if bk == nil then
    bk = {set = {}, list = {}}
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', v, b, b)) do
      local item = string.sub(m, string.find(m, '|', 1, true) + 1)
      bk.set[item] = true
      bk.list[#bk.list + 1] = item
    end
    buckets[b] = bk
  end
  return bk
end
local function visit(item, ts)
  local b = math.floor(ts / bucket_secs)
  -- Buckets older than the newest event by keep_secs no longer pair (and are
  -- trimmed), whenever the trim happens to run.
  if b < math.floor((lt - keep_secs) / bucket_secs) then return {} end
  local bk = bucket_of(b)
  if bk.set[item] or #bk.list >= bucket_items then return {} end
  local partners = {}
  for j, other in ipairs(bk.list) do partners[j] = other end
  bk.set[item] = true
  bk.list[#bk.list + 1] = item
  visit_adds[#visit_adds + 1] = {b, item}
  return partners
end

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
  local dk = nil
  if ARGV[a + 5] == '1' and dedupe_ttl > 0 then
    dk = KEYS[4 + ev]
    local prior = seen_now[dk]
    if prior == nil then
      local value = redis.call('GET', dk)
      if value then
        -- Seen before: answer the partners stored with it ('1' then one per line).
        prior = {}
        for item in string.gmatch(value, '\n([^\n]+)') do prior[#prior + 1] = item end
      end
    end
    if prior then
      fresh = false
      local out = {0}
      for j, item in ipairs(prior) do out[j + 1] = item end
      applied[ev] = out
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
    local partners = visit(item, ts)
    if dk then
      seen_now[dk] = partners
      dedupe_keys[#dedupe_keys + 1] = {dk, partners}
    end
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
    local out = {1}
    for j, other in ipairs(partners) do out[j + 1] = other end
    applied[ev] = out
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
  if #visit_adds > 0 then
    for _, add in ipairs(visit_adds) do
      redis.call('ZADD', v, add[1], string.format('%d|', add[1]) .. add[2])
    end
    local oldest = math.floor((lt - keep_secs) / bucket_secs)
    redis.call('ZREMRANGEBYSCORE', v, '-inf', '(' .. string.format('%d', oldest))
    redis.call('EXPIRE', v, math.ceil(keep_secs + bucket_secs))
  end
  for _, d in ipairs(dedupe_keys) do
    local value = '1'
    for _, item in ipairs(d[2]) do value = value .. '\n' .. item end
    redis.call('SET', d[1], value, 'EX', dedupe_ttl)
  end
  if user_ttl > 0 then
    redis.call('EXPIRE', h, user_ttl)
    redis.call('EXPIRE', r, user_ttl)
    if redis.call('EXISTS', p) == 1 then redis.call('EXPIRE', p, user_ttl) end
  end
end
return applied
