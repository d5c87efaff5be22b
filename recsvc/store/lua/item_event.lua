-- One shard's part of a batch of events: decayed popularity counters of the
-- shard's items, and the co-visitation neighbours of their rows. Mirrors
-- features.state.ItemTable.apply_event and add_neighbour operation for
-- operation. Every check comes before the first write, and the one write
-- that can fail for size comes first: on an error nothing is written. Rows are packed float64 (layout: recsvc.store.codec.item_layout)
-- at position * row bytes of the shard's state string; a row index is
-- position * shards + shard (features.state.item_row).
-- KEYS: state string, meta hash, dirty zset, ids list, then one dedupe key
--       per group (all under the shard's hash tag)
-- ARGV: the layout, storage format, dedupe_ttl, shard, number of shards, the
--       shard's epoch when the rows were read (another one now: items were
--       deleted in between, a row may be a deleted item's; refused), then
--       per group (one event's entries in this shard): dedupe (1/0), number
--       of entries, then the entries, each one of
--         'e', row, type, ts, pair_ts, n_partners, partner row...  (the event's item)
--         'p', row, other row, pair_ts                           (a partner's row)
-- Returns per group 1 (applied) or 0 (duplicate event id).
local width = tonumber(ARGV[1])
local col_ref, col_first = tonumber(ARGV[2]), tonumber(ARGV[3])
local col_counts, ntypes = tonumber(ARGV[6]), tonumber(ARGV[7])
local col_nbr_ref, col_nbr, col_nbr_score = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local nk, nbr_hl = tonumber(ARGV[11]), tonumber(ARGV[12])
local nh = tonumber(ARGV[13])
local hls = {}
for j = 1, nh do hls[j] = tonumber(ARGV[13 + j]) end
local base = 13 + nh
local format = ARGV[base + 1]
local dedupe_ttl = tonumber(ARGV[base + 2])
local shard, nshards = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
local read_epoch = ARGV[base + 5]
local nc = ntypes * nh
local row_bytes = width * 8
local fmt = '<' .. string.rep('d', width)
local nslot, nscore = col_nbr - 1, col_nbr_score - 1

-- Checks first.
local meta = redis.call('HMGET', KEYS[2], 'format', 'epoch')
local found = meta[1]
if not found then
  return redis.error_reply('shard ' .. shard .. ' holds no items (its keys are missing)')
end
if found ~= format then
  return redis.error_reply('recsvc storage format ' .. found .. ' in shard ' .. shard .. ', expected ' .. format)
end
if meta[2] ~= read_epoch then
  return redis.error_reply('shard ' .. shard .. ' changed while the events were applied (items deleted); retry')
end
local count = redis.call('LLEN', KEYS[4])
local size = redis.call('STRLEN', KEYS[1])
if size ~= count * row_bytes then
  return redis.error_reply('shard ' .. shard .. ' holds ' .. size .. ' bytes of rows for ' .. count .. ' items')
end
local function position(row)
  local pos = (row - shard) / nshards
  if pos ~= math.floor(pos) or pos < 0 or pos >= count then
    return nil
  end
  return pos
end
local groups = {}
local a = base + 6
while a <= #ARGV do
  local g = {dedupe = ARGV[a] == '1', entries = {}}
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    local e
    if ARGV[a] == 'e' then
      local np = tonumber(ARGV[a + 5])
      e = {kind = 'e', row = tonumber(ARGV[a + 1]), t = tonumber(ARGV[a + 2]),
           ts = tonumber(ARGV[a + 3]), pair_ts = tonumber(ARGV[a + 4]), partners = {}}
      for j = 1, np do e.partners[j] = tonumber(ARGV[a + 5 + j]) end
      a = a + 6 + np
    else
      e = {kind = 'p', row = tonumber(ARGV[a + 1]), other = tonumber(ARGV[a + 2]),
           pair_ts = tonumber(ARGV[a + 3])}
      a = a + 4
    end
    e.pos = position(e.row)
    if e.pos == nil then
      return redis.error_reply('shard ' .. shard .. ' has no item row ' .. e.row .. ' (' .. count .. ' items)')
    end
    g.entries[#g.entries + 1] = e
  end
  groups[#groups + 1] = g
end

local rows, order = {}, {}
local function row_at(pos)
  local row = rows[pos]
  if row == nil then
    local at = pos * row_bytes
    row = {struct.unpack(fmt, redis.call('GETRANGE', KEYS[1], at, at + row_bytes - 1))}
    row[width + 1] = nil
    rows[pos] = row
    order[#order + 1] = pos
  end
  return row
end

-- Mirrors features.state.ItemTable.add_neighbour.
local function add_neighbour(row, other, t)
  local ref = row[col_nbr_ref]
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
      row[col_nbr_ref] = ref
      return
    end
    if slot == 0 then
      row[nslot + j] = key
      row[nscore + j] = w
      row[col_nbr_ref] = ref
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
  row[col_nbr_ref] = ref
end

-- Mirrors features.state.ItemTable.apply_event.
local function count_event(row, t, ts)
  local ref = row[col_ref]
  if ts > ref then
    for hi = 0, nh - 1 do
      local f = 2 ^ (-(ts - ref) / hls[hi + 1])
      for k = hi, nc - 1, nh do row[col_counts + k] = row[col_counts + k] * f end
    end
    ref = ts
  end
  for hi = 0, nh - 1 do
    local k = t * nh + hi
    row[col_counts + k] = row[col_counts + k] + 2 ^ (-(ref - ts) / hls[hi + 1])
  end
  row[col_ref] = ref
  if row[col_first] == 0 or ts < row[col_first] then row[col_first] = ts end
end

local applied, seen_now, dedupe_keys = {}, {}, {}
for gi, g in ipairs(groups) do
  local fresh = true
  if g.dedupe and dedupe_ttl > 0 then
    -- Checked now, set after the rows are written: an error never loses an event.
    local dk = KEYS[4 + gi]
    fresh = not seen_now[dk] and redis.call('EXISTS', dk) == 0
    if fresh then
      seen_now[dk] = true
      dedupe_keys[#dedupe_keys + 1] = dk
    end
  end
  if fresh then
    for _, e in ipairs(g.entries) do
      local row = row_at(e.pos)
      if e.kind == 'e' then
        count_event(row, e.t, e.ts)
        for _, other in ipairs(e.partners) do add_neighbour(row, other, e.pair_ts) end
      else
        add_neighbour(row, e.other, e.pair_ts)
      end
    end
    applied[gi] = 1
  else
    applied[gi] = 0
  end
end
if #order > 0 then
  -- Rows from the highest offset down: SETRANGE checks offset + length against
  -- proto-max-bulk-len (even when the string does not grow), so if any row
  -- write can fail for size, the first one does, and then nothing is written.
  table.sort(order, function(x, y) return x > y end)
  for _, pos in ipairs(order) do
    redis.call('SETRANGE', KEYS[1], pos * row_bytes, struct.pack(fmt, unpack(rows[pos])))
  end
  local version = redis.call('HINCRBY', KEYS[2], 'ver', 1)
  local dirty = {}
  for _, pos in ipairs(order) do
    dirty[#dirty + 1] = version
    dirty[#dirty + 1] = pos
    if #dirty >= 400 then
      redis.call('ZADD', KEYS[3], unpack(dirty))
      dirty = {}
    end
  end
  if #dirty > 0 then redis.call('ZADD', KEYS[3], unpack(dirty)) end
end
for _, dk in ipairs(dedupe_keys) do redis.call('SET', dk, '1', 'EX', dedupe_ttl) end
return applied
