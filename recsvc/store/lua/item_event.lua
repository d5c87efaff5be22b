-- Item-side state for a batch of events and catalogue upserts: attributes,
-- decayed popularity and co-visitation neighbours, one packed float64 row per
-- item in one string (layout: features.state COL_*), so a serving process
-- copies the table with one GET, or only the rows changed since its version.
-- 'event' mirrors features.state.ItemTable.apply_event and add_pairs; 'upsert'
-- sets category and price. Returns one 1 (applied) or 0 (duplicate) per entry.
-- KEYS: idx hash, ids list, state string, category idx hash, categories list,
--       version counter, epoch, dirty zset, storage format, then one dedupe
--       key per entry (all in {items})
-- The epoch is set when the first item is created, so a reader notices that
-- the item keys were deleted and rebuilt even if the version came back equal.
-- The dirty zset scores each item index with the version that last changed it.
-- ARGV: dedupe_ttl, n_half_lives, half_life..., neighbours, covisit_half_life,
--       storage format (set with the first item), then per entry: mode, item, type, ts, category, price, dedupe (1/0),
--       pair_ts, n_partners, partner...
local dedupe_ttl = tonumber(ARGV[1])
local nh = tonumber(ARGV[2])
local hls = {}
for j = 1, nh do hls[j] = tonumber(ARGV[2 + j]) end
local nk = tonumber(ARGV[3 + nh])
local nbr_hl = tonumber(ARGV[4 + nh])
local storage_format = ARGV[5 + nh]
-- row[1] ref, row[2] first seen, row[3] price, row[4] category,
-- row[5 + k] counter k, row[nref] neighbour ref, row[nslot + j] neighbour j
-- (item index + 1, 0 = empty), row[nscore + j] its decayed pair count
local nref = 5 + 4 * nh
local nslot = nref
local nscore = nref + nk
local width = 4 + 4 * nh + 1 + 2 * nk
local fmt = '<' .. string.rep('d', width)

local function cat_id(c)
  if c == '' then return -1 end
  local ci = redis.call('HGET', KEYS[4], c)
  if ci then return tonumber(ci) end
  ci = redis.call('RPUSH', KEYS[5], c) - 1
  redis.call('HSET', KEYS[4], c, ci)
  return ci
end

local rows, order, index_of = {}, {}, {}
local function row_of(item, cat, price)
  local i = index_of[item]
  if i == nil then
    i = redis.call('HGET', KEYS[1], item)
    if i then i = tonumber(i) end
  end
  if i then
    index_of[item] = i
    if rows[i] == nil then
      local raw = redis.call('GETRANGE', KEYS[3], i * width * 8, (i + 1) * width * 8 - 1)
      local row = {struct.unpack(fmt, raw)}
      row[width + 1] = nil
      rows[i] = row
      order[#order + 1] = i
    end
    return rows[i], i
  end
  i = redis.call('RPUSH', KEYS[2], item) - 1
  redis.call('HSET', KEYS[1], item, i)
  index_of[item] = i
  if i == 0 then
    local now = redis.call('TIME')
    redis.call('SET', KEYS[7], now[1] .. '.' .. now[2])
    redis.call('SET', KEYS[9], storage_format)
  end
  local row = {}
  for k = 1, width do row[k] = 0.0 end
  row[3] = price
  row[4] = cat_id(cat)
  rows[i] = row
  order[#order + 1] = i
  return row, i
end

-- Mirrors features.state.ItemTable.add_neighbour.
local function add_neighbour(row, other, t)
  local ref = row[nref]
  if t > ref then
    local f = 2 ^ (-(t - ref) / nbr_hl)
    for j = 1, nk do row[nscore + j] = row[nscore + j] * f end
    ref = t
  end
  local w = 2 ^ (-(ref - t) / nbr_hl)
  local key = other + 1
  -- Slots fill from the front and are never emptied: the first empty slot
  -- ends the search.
  for j = 1, nk do
    local slot = row[nslot + j]
    if slot == key then
      row[nscore + j] = row[nscore + j] + w
      row[nref] = ref
      return
    end
    if slot == 0 then
      row[nslot + j] = key
      row[nscore + j] = w
      row[nref] = ref
      return
    end
  end
  -- Full: the weakest is the lowest count, ties to the lowest key (not the
  -- slot position, which depends on the order partners were listed in).
  local weakest = 1
  for j = 2, nk do
    local sj, sw = row[nscore + j], row[nscore + weakest]
    if sj < sw or (sj == sw and row[nslot + j] < row[nslot + weakest]) then weakest = j end
  end
  if w > row[nscore + weakest] then
    row[nslot + weakest] = key
    row[nscore + weakest] = w
  end
  row[nref] = ref
end

local applied = {}
local ev = 0
local seen_now, dedupe_keys = {}, {}
local a = 6 + nh
while a <= #ARGV do
  ev = ev + 1
  local mode, item = ARGV[a], ARGV[a + 1]
  local t = tonumber(ARGV[a + 2])
  local ts = tonumber(ARGV[a + 3])
  local cat = ARGV[a + 4]
  local price = tonumber(ARGV[a + 5])
  local dedupe = ARGV[a + 6] == '1'
  local pair_ts = tonumber(ARGV[a + 7])
  local n_partners = tonumber(ARGV[a + 8])
  local first_partner = a + 9
  a = first_partner + n_partners
  local fresh = true
  if mode == 'event' and dedupe and dedupe_ttl > 0 then
    -- Checked now, set after the rows are written: an error never loses an event.
    local dk = KEYS[9 + ev]
    fresh = not seen_now[dk] and redis.call('EXISTS', dk) == 0
    if fresh then
      seen_now[dk] = true
      dedupe_keys[#dedupe_keys + 1] = dk
    end
  end
  if fresh then
    local row, i = row_of(item, cat, price)
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
      for j = first_partner, first_partner + n_partners - 1 do
        local other_row, other = row_of(ARGV[j], '', 0.0)
        add_neighbour(row, other, pair_ts)
        add_neighbour(other_row, i, pair_ts)
      end
    end
    applied[ev] = 1
  else
    applied[ev] = 0
  end
end
if #order > 0 then
  local version = redis.call('INCR', KEYS[6])
  local dirty = {}
  for _, i in ipairs(order) do
    redis.call('SETRANGE', KEYS[3], i * width * 8, struct.pack(fmt, unpack(rows[i])))
    dirty[#dirty + 1] = version
    dirty[#dirty + 1] = i
    if #dirty >= 400 then
      redis.call('ZADD', KEYS[8], unpack(dirty))
      dirty = {}
    end
  end
  if #dirty > 0 then redis.call('ZADD', KEYS[8], unpack(dirty)) end
end
for _, dk in ipairs(dedupe_keys) do redis.call('SET', dk, '1', 'EX', dedupe_ttl) end
return applied
