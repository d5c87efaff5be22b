-- One shard's item rows changed since a reader's version, in one atomic read:
-- a serving process copies only what changed, shard by shard.
-- KEYS: meta hash, ids list, state string, dirty zset (the shard's keys)
-- ARGV: since_version (-1: everything), known (positions the reader holds),
--       the reader's epoch (another epoch: the shard was rebuilt, send
--       everything), storage format (another one: an error, never misread
--       rows), row bytes, max_rows (more changed rows than this: send everything)
-- Returns {epoch, version, new ids, mode, positions, rows, rows held, ids, bytes}:
-- mode 'same' (nothing changed), 'delta' (the rows at positions), or 'full'
-- (every row, and every id when the epoch changed); whole rows only. A
-- version below the reader's (data rolled back) answers 'delta' with nothing:
-- the reader sees the version go back and reloads everything. Rows held
-- is the row string's length in whole rows, ids the shard's id count, bytes the
-- string's length (not rows held * row bytes, or fewer rows than ids: damaged).
local meta = redis.call('HMGET', KEYS[1], 'format', 'epoch', 'ver')
if meta[1] and meta[1] ~= ARGV[4] then
  return redis.error_reply('recsvc storage format ' .. meta[1] .. ', expected ' .. ARGV[4])
end
-- A shard's epoch as readers see it names the server too (its run_id, new at
-- every start): after a failover to a replica or a restart from an older
-- snapshot, the same epoch and version can hold other data, so every reader
-- loads the shard again in full. Where INFO is renamed away or denied (ACL
-- -@dangerous), only a version that goes back is detected.
local epoch, version = meta[2] or '', meta[3] or '0'
if epoch ~= '' then
  local info = redis.pcall('INFO', 'server')
  local run = type(info) == 'string' and string.match(info, 'run_id:(%w+)') or ''
  epoch = epoch .. '@' .. run
end
local since, known = tonumber(ARGV[1]), tonumber(ARGV[2])
local row_bytes, max_rows = tonumber(ARGV[5]), tonumber(ARGV[6])
if epoch ~= ARGV[3] then since, known = -1, 0 end
local size = redis.call('STRLEN', KEYS[3])
local held = math.floor(size / row_bytes)
local total = redis.call('LLEN', KEYS[2])
if since >= 0 and tonumber(version) == since then
  return {epoch, version, {}, 'same', {}, '', held, total, size}
end
local ids = redis.call('LRANGE', KEYS[2], known, -1)
if since >= 0 and redis.call('ZCOUNT', KEYS[4], '(' .. since, '+inf') <= max_rows then
  local changed = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. since, '+inf')
  local positions, parts = {}, {}
  for _, pos in ipairs(changed) do
    local at = tonumber(pos) * row_bytes
    if tonumber(pos) < held then  -- whole rows only (a damaged string may end early)
      positions[#positions + 1] = pos
      parts[#parts + 1] = redis.call('GETRANGE', KEYS[3], at, at + row_bytes - 1)
    end
  end
  return {epoch, version, ids, 'delta', positions, table.concat(parts), held, total, size}
end
local rows = ''
if held > 0 then rows = redis.call('GETRANGE', KEYS[3], 0, held * row_bytes - 1) end
return {epoch, version, ids, 'full', {}, rows, held, total, size}
