-- Append a batch of impressions and outcomes to their capped streams in one call
-- (recsvc.ab.impressions): one reply for the batch instead of one per entry.
-- KEYS[1] impressions stream, KEYS[2] outcomes stream (both under {ab}).
-- ARGV[1] the cap (MAXLEN ~), ARGV[2] the number of impressions, then each
-- impression's JSON (field "json"), then each outcome as 5 values: request_id,
-- user_id, item_id, type, ts.
local cap = ARGV[1]
local impressions = tonumber(ARGV[2])
for i = 3, impressions + 2 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', cap, '*', 'json', ARGV[i])
end
for i = impressions + 3, #ARGV, 5 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', cap, '*', 'request_id', ARGV[i],
    'user_id', ARGV[i + 1], 'item_id', ARGV[i + 2], 'type', ARGV[i + 3], 'ts', ARGV[i + 4])
end
return #ARGV - 2
