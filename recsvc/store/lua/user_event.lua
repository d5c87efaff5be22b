-- Fold a batch of one user's events into their state; mirrors
-- features.state.apply_user_event operation for operation, event by event.
-- Returns per event {1, type, ts, item, partner...} (applied) or {0, type,
-- ts, item, partner...} (duplicate event id): the type, time (a string,
-- %.17g) and item the event was applied with and the items it forms
-- co-visitation pairs with, which the item-side scripts apply. A duplicate
-- returns what is stored with its dedupe key (the first attempt's type, time
-- and item, whatever the retry says, and its partners), so a retry after a
-- lost item-side call still carries its pairs, never counts another item and
-- counts the item at the time the user side did.
-- A dedupe value (recsvc.store.codec.dedupe_record): a byte (the type, 0-3)
-- and a little-endian float64 (the time), then the item and its partners,
-- one per line. The store rewrites it without the partners once the item
-- side has them (they are up to 19 ids). A value that starts with an id
-- character was written before type and time were kept: the retry's apply.
-- Reads and computes first, writes last (dedupe keys after the state), so a
-- script error can never mark an event as seen without applying it.
-- KEYS: state hash, recent zset, purchased zset, visits zset, then one dedupe
--       key per event (all in the user's {u:<id>} slot)
-- ARGV: the layout (recsvc.store.codec.user_layout: n_scalars, n_types,
--       recent_max, purchased_max, category_half_life, bucket_secs,
--       bucket_items, keep_secs, n_half_lives, half_life..., category_weight
--       per type), dedupe_ttl, user_ttl, then per event: type, ts, item,
--       category, price, dedupe (1/0)
local h, r, p, v = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local nsc = tonumber(ARGV[1])
local ntypes = tonumber(ARGV[2])
local recent_max = tonumber(ARGV[3])
local purchased_max = tonumber(ARGV[4])
local cat_hl = tonumber(ARGV[5])
local bucket_secs = tonumber(ARGV[6])
local bucket_items = tonumber(ARGV[7])
local keep_secs = tonumber(ARGV[8])
local nh = tonumber(ARGV[9])
local hls, cws = {}, {}
for j = 1, nh do hls[j] = tonumber(ARGV[9 + j]) end
for j = 0, ntypes - 1 do cws[j] = tonumber(ARGV[10 + nh + j]) end
local dedupe_ttl = tonumber(ARGV[10 + nh + ntypes])
local user_ttl = tonumber(ARGV[11 + nh + ntypes])
local first_event = 12 + nh + ntypes
local nc = ntypes * nh

-- State hash fields: 'x' packed float64 scalars (n, ref, lt, lp, ps, pn: the
-- first six of codec.USER_SCALARS, nsc in all), then the counters;
-- 'an' category names, each a little-endian uint32 length then the bytes;
-- 'av' packed float64 affinities in the order of 'an'. Packed, because
-- formatting and parsing ~30 decimal fields dominated the script's time.
local xfmt = '<' .. string.rep('d', nsc + nc)
local fields = redis.call('HMGET', h, 'x', 'an', 'av')
local n, ref, lt, lp, ps, pn = 0, 0.0, 0.0, 0.0, 0.0, 0
local counts = {}
for k = 0, nc - 1 do counts[k] = 0.0 end
if fields[1] then
  local x = {struct.unpack(xfmt, fields[1])}
  n, ref, lt, lp, ps, pn = x[1], x[2], x[3], x[4], x[5], x[6]
  for k = 0, nc - 1 do counts[k] = x[nsc + 1 + k] end
end
local names, aff = {}, {}
if fields[2] then
  local an, av = fields[2], fields[3]
  local pos, vpos = 1, 1
  while pos <= #an do
    local len, value
    len, pos = struct.unpack('<I4', an, pos)
    local name = string.sub(an, pos, pos + len - 1)
    pos = pos + len
    value, vpos = struct.unpack('<d', av, vpos)
    names[#names + 1] = name
    aff[name] = value
  end
end
local names_changed = false

-- Co-visitation buckets touched by this batch: loaded once, written at the end.
-- Members are '<bucket>|<item>'. Mirrors features.state.visit_partners.
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
-- A dedupe value as {type, ts, item, partner...}; t, ts: the retry's, for a
-- value written before they were kept.
local function parse(value, t, ts)
  local body = value
  if #value >= 9 and string.byte(value, 1) < 4 then
    t, ts = struct.unpack('<Bd', value)
    body = string.sub(value, 10)
  end
  local rec = {t, ts}
  for line in string.gmatch(body, '[^\n]+') do rec[#rec + 1] = line end
  return rec
end
local function answer(flag, rec)
  local out = {flag, rec[1], string.format('%.17g', rec[2])}
  for j = 3, #rec do out[j + 1] = rec[j] end
  return out
end

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
      if value then prior = parse(value, t, ts) end
    end
    if prior then
      fresh = false
      applied[ev] = answer(0, prior)
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
      for _, c in ipairs(names) do aff[c] = aff[c] * fc end
      ref = ts
    end
    for hi = 0, nh - 1 do
      local k = t * nh + hi
      counts[k] = counts[k] + 2 ^ (-(ref - ts) / hls[hi + 1])
    end
    if cat ~= '' then
      if aff[cat] == nil then
        names[#names + 1] = cat
        aff[cat] = 0.0
        names_changed = true
      end
      aff[cat] = aff[cat] + cws[t] * 2 ^ (-(ref - ts) / cat_hl)
    end
    if ts > lt then lt = ts end
    local partners = visit(item, ts)
    local record = {t, ts, item}
    for j, other in ipairs(partners) do record[j + 3] = other end
    if dk then
      seen_now[dk] = record
      dedupe_keys[#dedupe_keys + 1] = {dk, record}
    end
    if t == 3 then
      if ts > lp then lp = ts end
      purchases[#purchases + 1] = {ts, item}
    end
    if price > 0 then
      ps = ps + price
      pn = pn + 1
    end
    n = n + 1
    recent_adds[#recent_adds + 1] = {ts, item}
    applied[ev] = answer(1, record)
  end
end

if changed then
  local xv = {n, ref, lt, lp, ps, pn}
  for k = 0, nc - 1 do xv[nsc + 1 + k] = counts[k] end
  local parts = {}
  -- In bounded chunks: unpack() of an unbounded table can fail.
  for j = 1, #names, 200 do
    local vals = {}
    for q = j, math.min(j + 199, #names) do vals[#vals + 1] = aff[names[q]] end
    parts[#parts + 1] = struct.pack('<' .. string.rep('d', #vals), unpack(vals))
  end
  local out = {'x', struct.pack(xfmt, unpack(xv)), 'av', table.concat(parts)}
  if names_changed then
    local packed = {}
    for q, c in ipairs(names) do packed[q] = struct.pack('<I4', #c) .. c end
    out[5], out[6] = 'an', table.concat(packed)
  end
  redis.call('HSET', h, unpack(out))
  -- Per event, in order, as features.state trims after each event.
  for _, add in ipairs(recent_adds) do
    redis.call('ZADD', r, 'GT', add[1], add[2])
    redis.call('ZREMRANGEBYRANK', r, 0, -(recent_max + 1))
  end
  if redis.call('TYPE', p)['ok'] == 'set' then
    -- Written before purchases were capped (an unbounded set, times unknown):
    -- up to purchased_max of its items stay, as the oldest purchases. UNLINK
    -- frees a large set in the background.
    local old = redis.call('SRANDMEMBER', p, purchased_max)
    redis.call('UNLINK', p)
    for j = 1, #old, 200 do
      local args = {}
      for q = j, math.min(j + 199, #old) do
        args[#args + 1] = 0
        args[#args + 1] = old[q]
      end
      redis.call('ZADD', p, unpack(args))
    end
  end
  -- Per purchase, in order, as features.state trims after each event.
  for _, add in ipairs(purchases) do
    redis.call('ZADD', p, 'GT', add[1], add[2])
    redis.call('ZREMRANGEBYRANK', p, 0, -(purchased_max + 1))
  end
  if #visit_adds > 0 then
    for _, add in ipairs(visit_adds) do
      redis.call('ZADD', v, add[1], string.format('%d|', add[1]) .. add[2])
    end
    local oldest = math.floor((lt - keep_secs) / bucket_secs)
    redis.call('ZREMRANGEBYSCORE', v, '-inf', '(' .. string.format('%d', oldest))
    redis.call('EXPIRE', v, math.ceil(keep_secs + bucket_secs))
  end
  for _, d in ipairs(dedupe_keys) do
    local rec = d[2]
    local value = struct.pack('<Bd', rec[1], rec[2]) .. table.concat(rec, '\n', 3)
    redis.call('SET', d[1], value, 'EX', dedupe_ttl)
  end
  if user_ttl > 0 then
    redis.call('EXPIRE', h, user_ttl)
    redis.call('EXPIRE', r, user_ttl)
    if redis.call('EXISTS', p) == 1 then redis.call('EXPIRE', p, user_ttl) end
  end
end
return applied
