-- Item rows changed since a reader's version, in one atomic read: a serving
-- process copies only what changed instead of the whole table every refresh.
-- KEYS: epoch, version, ids list, categories list, state string, dirty zset,
--       storage format
-- ARGV: since_version (-1: everything), known_items, known_categories,
--       row_bytes, max_rows (more changed rows than this: send everything),
--       the reader's epoch (another epoch: the keys were rebuilt, send everything),
--       the reader's storage format (another one: an error, never misread rows)
-- Returns {epoch, version, new ids, new categories, mode, indices, rows}
-- where mode 'full' sends the whole state string as rows and no indices, and
-- all ids and categories when the epoch changed.
local since = tonumber(ARGV[1])
local known_items, known_cats = ARGV[2], ARGV[3]
local row_bytes = tonumber(ARGV[4])
local max_rows = tonumber(ARGV[5])
local format = redis.call('GET', KEYS[7])
if format and format ~= ARGV[7] then
  return redis.error_reply('recsvc storage format ' .. format .. ', expected ' .. ARGV[7])
end
local epoch = redis.call('GET', KEYS[1]) or ''
local version = redis.call('GET', KEYS[2]) or '0'
if epoch ~= ARGV[6] then since, known_items, known_cats = -1, 0, 0 end
local ids = redis.call('LRANGE', KEYS[3], known_items, -1)
local cats = redis.call('LRANGE', KEYS[4], known_cats, -1)
if since >= 0 and redis.call('ZCOUNT', KEYS[6], '(' .. since, '+inf') <= max_rows then
  local changed = redis.call('ZRANGEBYSCORE', KEYS[6], '(' .. since, '+inf')
  local parts = {}
  for j, i in ipairs(changed) do
    local at = tonumber(i) * row_bytes
    parts[j] = redis.call('GETRANGE', KEYS[5], at, at + row_bytes - 1)
  end
  return {epoch, version, ids, cats, 'delta', changed, table.concat(parts)}
end
return {epoch, version, ids, cats, 'full', {}, redis.call('GET', KEYS[5]) or ''}
