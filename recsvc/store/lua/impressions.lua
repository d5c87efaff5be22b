-- Append a batch of impressions and outcomes to their capped streams in one call
-- (recsvc.ab.impressions): one reply for the batch instead of one per entry.
-- KEYS[1] impressions stream, KEYS[2] outcomes stream (both under {ab}).
-- ARGV[1] the impressions' cap and ARGV[2] the outcomes' (MAXLEN ~), ARGV[3]
-- the number of impressions, then each impression's JSON (field "json"), then
-- each outcome as 5 values: request_id, user_id, item_id, type, ts.
local cap = ARGV[1]
local outcome_cap = ARGV[2]
local impressions = tonumber(ARGV[3])
for i = 4, impressions + 3 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', cap, '*', 'json', ARGV[i])
end
for i = impressions + 4, #ARGV, 5 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', outcome_cap, '*', 'request_id', ARGV[i],
    'user_id', ARGV[i + 1], 'item_id', ARGV[i + 2], 'type', ARGV[i + 3], 'ts', ARGV[i + 4])
end
return #ARGV - 3
