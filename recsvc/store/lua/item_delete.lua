-- Delete items from one shard. The id leaves the index (an event naming it is
-- then an unknown item, see item_upsert.lua), its place in the ids list holds
-- '' and its row is emptied (as features.state.empty_rows); the position is
-- never reused, because other items' co-visitation slots may still name the
-- row (readers skip rows that hold no item). The shard gets a new epoch, so
-- every reader loads it again in full; the meta hash keeps 'deleted:<id>', so
-- an event cannot create the item again (item_upsert.lua; a catalogue upsert
-- can). Checks come before the first write, and the one write that can fail
-- for size (a row's SETRANGE past proto-max-bulk-len) comes first, highest
-- offset first: on an error nothing is written.
-- KEYS: idx hash, ids list, state string, meta hash, dirty zset (the shard's)
-- ARGV: the layout (recsvc.store.codec.item_layout), storage format, shard,
--       then the ids to delete
-- Returns per id 1 (deleted) or 0 (the shard does not hold it).
local width = tonumber(ARGV[1])
local col_cat = tonumber(ARGV[5])
local nh = tonumber(ARGV[13])
local base = 13 + nh
local format = ARGV[base + 1]
local shard = ARGV[base + 2]
local row_bytes = width * 8

local found = redis.call('HGET', KEYS[4], 'format')
if found and found ~= format then
  return redis.error_reply('recsvc storage format ' .. found .. ' in shard ' .. shard .. ', expected ' .. format)
end
local count = redis.call('LLEN', KEYS[2])
local size = redis.call('STRLEN', KEYS[3])
if size ~= count * row_bytes then
  return redis.error_reply('shard ' .. shard .. ' holds ' .. size .. ' bytes of rows for ' .. count .. ' items')
end
local out, gone = {}, {}
for a = base + 3, #ARGV do
  local pos = redis.call('HGET', KEYS[1], ARGV[a])
  if pos and gone[ARGV[a]] == nil then
    pos = tonumber(pos)
    if pos >= count then
      return redis.error_reply('shard ' .. shard .. ': ' .. ARGV[a] .. ' at ' .. pos .. ' of ' .. count)
    end
    gone[ARGV[a]] = pos
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if next(gone) == nil then return out end

local zero = {}
for c = 1, width do zero[c] = 0.0 end
zero[col_cat] = -1
local empty = struct.pack('<' .. string.rep('d', width), unpack(zero))
local order, marks = {}, {}
for id, pos in pairs(gone) do
  order[#order + 1] = pos
  marks[#marks + 1] = 'deleted:' .. id
  marks[#marks + 1] = 1
end
table.sort(order, function(x, y) return x > y end)
for _, pos in ipairs(order) do redis.call('SETRANGE', KEYS[3], pos * row_bytes, empty) end
for id, pos in pairs(gone) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('LSET', KEYS[2], pos, '')
end
redis.call('HSET', KEYS[4], unpack(marks))
local now = redis.call('TIME')
redis.call('HSET', KEYS[4], 'epoch', now[1] .. '.' .. now[2] .. 'd')
redis.call('HINCRBY', KEYS[4], 'ver', 1)
redis.call('DEL', KEYS[5])
return out
