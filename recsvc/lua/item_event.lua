-- Item-side state for a batch of events and catalogue upserts: attributes and
-- decayed popularity, one packed float64 row per item in one string (layout:
-- features.state COL_*), so a serving process copies the table with one GET.
-- 'event' mirrors features.state.ItemTable.apply_event; 'upsert' sets
-- category and price. Returns one 1 (applied) or 0 (duplicate) per entry.
-- KEYS: idx hash, ids list, state string, category idx hash, categories list,
--       version counter, epoch, then one dedupe key per entry (all in {items})
-- The epoch is set when the first item is created, so a reader notices that
-- the item keys were deleted and rebuilt even if the version came back equal.
-- ARGV: dedupe_ttl, n_half_lives, half_life..., then per entry:
--       mode, item, type, ts, category, price, dedupe (1/0)
local dedupe_ttl = tonumber(ARGV[1])
local nh = tonumber(ARGV[2])
local hls = {}
for j = 1, nh do hls[j] = tonumber(ARGV[2 + j]) end
local width = 4 + 4 * nh
local fmt = '<' .. string.rep('d', width)

local function cat_id(c)
  if c == '' then return -1 end
  local ci = redis.call('HGET', KEYS[4], c)
  if ci then return tonumber(ci) end
  ci = redis.call('RPUSH', KEYS[5], c) - 1
  redis.call('HSET', KEYS[4], c, ci)
  return ci
end

local rows, order = {}, {}
local function row_of(item, cat, price)
  local i = redis.call('HGET', KEYS[1], item)
  if i then
    i = tonumber(i)
    if rows[i] == nil then
      local raw = redis.call('GETRANGE', KEYS[3], i * width * 8, (i + 1) * width * 8 - 1)
      local row = {struct.unpack(fmt, raw)}
      row[width + 1] = nil
      rows[i] = row
      order[#order + 1] = i
    end
    return rows[i]
  end
  i = redis.call('RPUSH', KEYS[2], item) - 1
  redis.call('HSET', KEYS[1], item, i)
  if i == 0 then
    local now = redis.call('TIME')
    redis.call('SET', KEYS[7], now[1] .. '.' .. now[2])
  end
  local row = {}
  for k = 1, width do row[k] = 0.0 end
  row[3] = price
  row[4] = cat_id(cat)
  rows[i] = row
  order[#order + 1] = i
  return row
end

local applied = {}
local ev = 0
local seen_now, dedupe_keys = {}, {}
for a = 3 + nh, #ARGV, 7 do
  ev = ev + 1
  local mode, item = ARGV[a], ARGV[a + 1]
  local t = tonumber(ARGV[a + 2])
  local ts = tonumber(ARGV[a + 3])
  local cat = ARGV[a + 4]
  local price = tonumber(ARGV[a + 5])
  local fresh = true
  if mode == 'event' and ARGV[a + 6] == '1' and dedupe_ttl > 0 then
    -- Checked now, set after the rows are written: an error never loses an event.
    local dk = KEYS[7 + ev]
    fresh = not seen_now[dk] and redis.call('EXISTS', dk) == 0
    if fresh then
      seen_now[dk] = true
      dedupe_keys[#dedupe_keys + 1] = dk
    end
  end
  if fresh then
    local row = row_of(item, cat, price)
    if mode == 'upsert' then
      row[3] = price
      row[4] = cat_id(cat)
    else
      -- row[1] ref, row[2] first seen, row[5 + k] counter k
      local ref = row[1]
      if ts > ref then
        for hi = 0, nh - 1 do
          local f = 2 ^ (-(ts - ref) / hls[hi + 1])
          for k = hi, 4 * nh - 1, nh do row[5 + k] = row[5 + k] * f end
        end
        ref = ts
      end
      for hi = 0, nh - 1 do
        local k = t * nh + hi
        row[5 + k] = row[5 + k] + 2 ^ (-(ref - ts) / hls[hi + 1])
      end
      row[1] = ref
      if row[2] == 0 or ts < row[2] then row[2] = ts end
    end
    applied[ev] = 1
  else
    applied[ev] = 0
  end
end
for _, i in ipairs(order) do
  redis.call('SETRANGE', KEYS[3], i * width * 8, struct.pack(fmt, unpack(rows[i])))
end
if #order > 0 then redis.call('INCR', KEYS[6]) end
for _, dk in ipairs(dedupe_keys) do redis.call('SET', dk, '1', 'EX', dedupe_ttl) end
return applied
