-- Create items in one shard (bare rows, or with catalogue attributes) and set
-- catalogue attributes. Every check comes before the first write: on an error
-- nothing is written; an item the shard has no room for is answered -1 and
-- not created, an unknown item the policy refuses (or a deleted one, see
-- item_delete.lua) -2; the others are. Answers the shard's epoch too: the
-- item-side script refuses rows read under another epoch (items deleted in
-- between).
-- KEYS: idx hash (id -> position), ids list, state string, meta hash, dirty zset
--       (all under the shard's hash tag, recsvc.store.keys.shard_keys)
-- ARGV: the layout (recsvc.store.codec.item_layout), storage format, the
--       shard's capacity in rows, shard, number of shards, the unknown-item
--       policy for mode 'e' ('create', 'reject', or 'auto': reject when the
--       shard's meta says a catalogue was loaded), then per item: id, mode
--       ('e': create bare when new, as the policy allows; 's': create or set
--       category and price), category id, price
-- Returns {epoch, rows}: per item its row (position * shards + shard), -1 (no
-- room) or -2 (unknown, refused by the policy, or deleted).
local width = tonumber(ARGV[1])
local col_price, col_cat = tonumber(ARGV[4]), tonumber(ARGV[5])
local nh = tonumber(ARGV[13])
local base = 13 + nh
local format = ARGV[base + 1]
local capacity = tonumber(ARGV[base + 2])
local shard, nshards = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
local policy = ARGV[base + 5]
local row_bytes = width * 8
local fmt = '<' .. string.rep('d', width)

local meta = redis.call('HMGET', KEYS[4], 'format', 'catalogue')
local found = meta[1]
local refuse = policy == 'reject' or (policy == 'auto' and meta[2] == '1')
if found and found ~= format then
  return redis.error_reply('recsvc storage format ' .. found .. ' in shard ' .. shard .. ', expected ' .. format)
end
local count = redis.call('LLEN', KEYS[2])
local size = redis.call('STRLEN', KEYS[3])
if size ~= count * row_bytes then
  return redis.error_reply('shard ' .. shard .. ' holds ' .. size .. ' bytes of rows for ' .. count .. ' items')
end

local out, new, sets = {}, {}, {}
local new_at = {}  -- id -> index in new
local k = 0
for a = base + 6, #ARGV, 4 do
  k = k + 1
  local id, mode = ARGV[a], ARGV[a + 1]
  local cat, price = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local j = new_at[id]
  if j then
    if mode == 's' then new[j][2], new[j][3], new[j][4] = cat, price, true end
    out[k] = (count + j - 1) * nshards + shard
  else
    local pos = redis.call('HGET', KEYS[1], id)
    if pos then
      pos = tonumber(pos)
      if pos >= count then
        return redis.error_reply('shard ' .. shard .. ': ' .. id .. ' at ' .. pos .. ' of ' .. count)
      end
      if mode == 's' then sets[#sets + 1] = {pos, cat, price} end
      out[k] = pos * nshards + shard
    elseif mode == 'e' and (refuse or redis.call('HEXISTS', KEYS[4], 'deleted:' .. id) == 1) then
      out[k] = -2
    elseif count + #new < capacity then
      if mode == 's' then
        new[#new + 1] = {id, cat, price, true}
      else
        new[#new + 1] = {id, -1, 0.0, false}
      end
      new_at[id] = #new
      out[k] = (count + #new - 1) * nshards + shard
    else
      out[k] = -1
    end
  end
end

local function answer()
  return {redis.call('HGET', KEYS[4], 'epoch') or '', out}
end
if #new == 0 and #sets == 0 then return answer() end
-- The writes that can fail for size come first, so that if one fails nothing
-- has been written: the row string's growth (past proto-max-bulk-len, which may
-- have been lowered since the capacity was read), else the row rewrites from
-- the highest offset down (SETRANGE checks offset + length against the limit).
if #new > 0 then
  local rows, zero = {}, {}
  for c = 1, width do zero[c] = 0.0 end
  for j, e in ipairs(new) do
    zero[col_cat], zero[col_price] = e[2], e[3]
    rows[j] = struct.pack(fmt, unpack(zero))
  end
  redis.call('APPEND', KEYS[3], table.concat(rows))
end
table.sort(sets, function(x, y) return x[1] > y[1] end)
for _, s in ipairs(sets) do
  local at = s[1] * row_bytes
  local row = {struct.unpack(fmt, redis.call('GETRANGE', KEYS[3], at, at + row_bytes - 1))}
  row[width + 1] = nil
  row[col_cat], row[col_price] = s[2], s[3]
  redis.call('SETRANGE', KEYS[3], at, struct.pack(fmt, unpack(row)))
end
if count == 0 and redis.call('HEXISTS', KEYS[4], 'epoch') == 0 then
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[4], 'epoch', now[1] .. '.' .. now[2], 'format', format)
end
local version = redis.call('HINCRBY', KEYS[4], 'ver', 1)
local dirty = {}
local function mark(pos)
  dirty[#dirty + 1] = version
  dirty[#dirty + 1] = pos
  if #dirty >= 400 then
    redis.call('ZADD', KEYS[5], unpack(dirty))
    dirty = {}
  end
end
for _, s in ipairs(sets) do mark(s[1]) end
local ids, index = {}, {}
for j, e in ipairs(new) do
  ids[#ids + 1] = e[1]
  index[#index + 1] = e[1]
  index[#index + 1] = count + j - 1
  mark(count + j - 1)
  if #ids >= 200 then
    redis.call('RPUSH', KEYS[2], unpack(ids))
    redis.call('HSET', KEYS[1], unpack(index))
    ids, index = {}, {}
  end
end
if #ids > 0 then
  redis.call('RPUSH', KEYS[2], unpack(ids))
  redis.call('HSET', KEYS[1], unpack(index))
end
if #dirty > 0 then redis.call('ZADD', KEYS[5], unpack(dirty)) end
local revived = {}
for _, e in ipairs(new) do
  if e[4] then revived[#revived + 1] = 'deleted:' .. e[1] end  -- back in the catalogue
end
if #revived > 0 then redis.call('HDEL', KEYS[4], unpack(revived)) end
return answer()
