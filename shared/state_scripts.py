"""The job store's Lua scripts: each multi-key change runs atomically inside Redis.

Kept apart from ``shared.state`` so the Python side reads as plain methods. Scripts return small
codes that ``JobStore`` turns into results or FaceFarm errors.
"""

from __future__ import annotations

# Common prelude: finish a job (status + index bookkeeping). KEYS[1]=job, KEYS[2]=active, KEYS[3]=finished.
LUA_PRELUDE = """
local function set_job_status(jobkey, activekey, finishedkey, jobid, status, now, err, kind)
  redis.call('HSET', jobkey, 'status', status, 'updated_at', now)
  if err ~= nil then redis.call('HSET', jobkey, 'error', err, 'error_kind', kind) end
  if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then
    redis.call('SREM', activekey, jobid)
    redis.call('ZADD', finishedkey, now, jobid)
    redis.call('HSET', jobkey, 'finished_at', now)
  else
    redis.call('SADD', activekey, jobid)
    redis.call('ZREM', finishedkey, jobid)
  end
end
local function is_finished(status)
  return status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED'
end
local function end_attempt(chunkkey, attempt_id, now, err)
  local raw = redis.call('HGET', chunkkey, 'attempts')
  local attempts = {}
  if raw and raw ~= '' then attempts = cjson.decode(raw) end
  for i = #attempts, 1, -1 do
    if attempts[i]['id'] == attempt_id then
      attempts[i]['end'] = tonumber(now)
      if err ~= nil then attempts[i]['error'] = err end
      break
    end
  end
  if #attempts > 0 then redis.call('HSET', chunkkey, 'attempts', cjson.encode(attempts)) end
end
local function json_list(raw)
  if raw == false or raw == nil or raw == '' then return {} end
  local value = cjson.decode(raw)
  if type(value) ~= 'table' then return {} end
  return value
end
local function contains(list, item)
  for _, v in ipairs(list) do if v == item then return true end end
  return false
end
local function add_failed_worker(chunkkey, worker)
  if worker == nil or worker == false or worker == '' then return end
  local list = json_list(redis.call('HGET', chunkkey, 'failed_workers'))
  if contains(list, worker) then return end
  table.insert(list, worker)
  redis.call('HSET', chunkkey, 'failed_workers', cjson.encode(list))
end
-- One more failure in a row for a worker; past the threshold it is blocked for ttl seconds.
local function worker_failed(prefix, worker, threshold, ttl, now, reason)
  if prefix == nil or prefix == '' or worker == nil or worker == false or worker == '' then return 0 end
  local fails = redis.call('HINCRBY', prefix .. worker, 'consecutive_failures', 1)
  redis.call('HSET', prefix .. worker, 'last_failure', reason, 'last_failure_at', now)
  if threshold > 0 and fails >= threshold then
    local bkey = prefix .. worker .. ':blocked'
    if redis.call('EXISTS', bkey) == 0 then
      redis.call('SET', bkey, cjson.encode({reason = reason, at = tonumber(now), failures = fails}), 'EX', ttl)
    end
    return 1
  end
  return 0
end
"""

# KEYS: job, active, finished. ARGV: new status, now, job id, error or '', kind or '', allowed-from...
SET_STATUS = (
    LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
local ok = false
for i = 6, #ARGV do if ARGV[i] == cur then ok = true end end
if not ok then return {0, cur} end
local err = nil
if ARGV[4] ~= '' then err = ARGV[4] end
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[3], ARGV[1], ARGV[2], err, ARGV[5])
return {1, cur}
"""
)

# KEYS: job, active, finished. ARGV: now, job id.
REQUEST_CANCEL = (
    LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
if is_finished(cur) then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'CANCELLED', ARGV[1], 'cancelled by the owner', 'JobCancelledError')
return 1
"""
)

# KEYS: job, active, finished, chunk keys... ARGV: now, job id, frames_total, video_info, encoder, specs...
RECORD_PLAN = (
    LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if cur ~= 'PLANNING' or redis.call('HGET', KEYS[1], 'cancel') == '1' then return 0 end
local n = #KEYS - 3
for i = 1, n do
  local spec = cjson.decode(ARGV[5 + i])
  redis.call('HSET', KEYS[3 + i], 'spec', ARGV[5 + i], 'index', spec['index'], 'status', 'PENDING',
    'frame_count', spec['end_frame'] - spec['start_frame'], 'attempt_id', '', 'worker', '',
    'heartbeat_at', '0', 'frames_done', '0', 'hwm', '0', 'deliveries', '0', 'attempts', '[]', 'error', '',
    'failed_workers', '[]')
end
redis.call('HSET', KEYS[1], 'chunks_total', n, 'frames_total', ARGV[3], 'video_info', ARGV[4],
  'encoder', ARGV[5], 'rate_t0', ARGV[1], 'rate_f0', '0')
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'RENDERING', ARGV[1], nil, nil)
return 1
"""
)

# KEYS: job, active, finished, chunk. ARGV: attempt id, worker, now, max attempts, job id, index,
# message (task) id ('' = unknown), duplicate guard seconds ('' = none), worker key prefix ('' = no worker
# bookkeeping), block threshold, block ttl s, then the names of other workers that could take the chunk.
# -> {'ok', n} | {'busy', worker} | {'avoid', worker} | {'exhausted', reason} | {'done', s} | ...
START_ATTEMPT = (
    LUA_PRELUDE
    + """
local job = redis.call('HMGET', KEYS[1], 'status', 'cancel')
if job[1] == false then return {'missing'} end
if job[2] == '1' then return {'cancelled'} end
if job[1] ~= 'RENDERING' then return {'inactive', job[1]} end
local chunk = redis.call('HMGET', KEYS[4], 'status', 'error', 'attempt_id', 'worker', 'heartbeat_at', 'task_id')
if chunk[1] == false then return {'missing'} end
if chunk[1] == 'COMMITTED' or chunk[1] == 'FAILED' then return {'done', chunk[1]} end
local now = tonumber(ARGV[3])
if chunk[1] == 'RUNNING' and chunk[3] and chunk[3] ~= '' then
  -- The same message again means the process that ran it died (Celery redelivered it). Another
  -- message while the attempt heartbeats on another worker is a duplicate (or a stale redelivery
  -- of a message whose attempt was already replaced): drop it. Otherwise the attempt is dead.
  local same_message = ARGV[7] ~= '' and chunk[6] == ARGV[7]
  local fresh = ARGV[8] ~= '' and (now - tonumber(chunk[5] or '0')) < tonumber(ARGV[8])
  if not same_message and fresh and chunk[4] ~= ARGV[2] then
    return {'busy', chunk[4]}
  end
  -- the running attempt never ended: its process died (a redelivery), or it is fenced out now
  local reason = 'worker ' .. (chunk[4] or '?') .. ' was lost while rendering (process died or was killed)'
  end_attempt(KEYS[4], chunk[3], ARGV[3], reason)
  add_failed_worker(KEYS[4], chunk[4])
  worker_failed(ARGV[9], chunk[4], tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[3], reason)
  redis.call('HSET', KEYS[4], 'status', 'PENDING', 'attempt_id', '', 'error', reason)
end
local failed = json_list(redis.call('HGET', KEYS[4], 'failed_workers'))
if contains(failed, ARGV[2]) then
  for i = 12, #ARGV do
    if not contains(failed, ARGV[i]) then return {'avoid', ARGV[i]} end
  end
end
local n = redis.call('HINCRBY', KEYS[4], 'deliveries', 1)
if n > tonumber(ARGV[4]) then
  local last = redis.call('HGET', KEYS[4], 'error') or ''
  local reason = 'chunk ' .. ARGV[6] .. ' failed after ' .. ARGV[4] .. ' attempts'
  if last ~= '' then reason = reason .. ': ' .. last end
  redis.call('HSET', KEYS[4], 'status', 'FAILED', 'attempt_id', '', 'error', reason)
  set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[5], 'FAILED', ARGV[3], reason, 'AttemptsExhaustedError')
  return {'exhausted', reason}
end
local raw = redis.call('HGET', KEYS[4], 'attempts')
local attempts = {}
if raw and raw ~= '' then attempts = cjson.decode(raw) end
table.insert(attempts, {id = ARGV[1], worker = ARGV[2], start = now})
redis.call('HSET', KEYS[4], 'status', 'RUNNING', 'attempt_id', ARGV[1], 'worker', ARGV[2],
  'heartbeat_at', ARGV[3], 'frames_done', '0', 'attempts', cjson.encode(attempts), 'task_id', ARGV[7])
if redis.call('HGET', KEYS[1], 'render_started_at') == false then
  redis.call('HSET', KEYS[1], 'render_started_at', ARGV[3])
end
return {'ok', tostring(n)}
"""
)

# KEYS: job, chunk. ARGV: attempt id, frames done, now. -> 1 recorded, 2 cancelled (not recorded), -1 stale
HEARTBEAT = """
if redis.call('HGET', KEYS[2], 'attempt_id') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
local done = tonumber(ARGV[2])
local count = tonumber(redis.call('HGET', KEYS[2], 'frame_count'))
if done > count then done = count end
if done < 0 then done = 0 end
redis.call('HSET', KEYS[2], 'heartbeat_at', ARGV[3], 'frames_done', done)
if done > tonumber(redis.call('HGET', KEYS[2], 'hwm')) then redis.call('HSET', KEYS[2], 'hwm', done) end
return 1
"""

# KEYS: job, chunk, committed. ARGV: attempt id, stats json, now, index, worker key prefix ('' = none).
# -> 1 last, 0 not last, -1 stale, -2 cancelled. A commit ends the worker's run of failures.
COMMIT = (
    LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[2], 'attempt_id') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return -2 end
if redis.call('HGET', KEYS[2], 'status') == 'COMMITTED' then return 0 end
if ARGV[5] and ARGV[5] ~= '' then
  local w = redis.call('HGET', KEYS[2], 'worker')
  if w and w ~= '' then redis.call('HSET', ARGV[5] .. w, 'consecutive_failures', '0') end
end
local count = redis.call('HGET', KEYS[2], 'frame_count')
redis.call('HSET', KEYS[2], 'status', 'COMMITTED', 'stats', ARGV[2], 'frames_done', count, 'hwm', count,
  'committed_at', ARGV[3], 'heartbeat_at', ARGV[3], 'error', '')
end_attempt(KEYS[2], ARGV[1], ARGV[3], nil)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
local added = redis.call('SADD', KEYS[3], ARGV[4])
local total = tonumber(redis.call('HGET', KEYS[1], 'chunks_total'))
if added == 1 and redis.call('SCARD', KEYS[3]) == total then return 1 end
return 0
"""
)

# KEYS: job, active, finished, chunk. ARGV: attempt id, now, job id, index, message, kind, permanent, max attempts,
# worker key prefix ('' = none), block threshold, block ttl s. -> 1 will retry, 0 failed for good, -1 stale
# A retryable failure marks the worker as failed for this chunk (it is avoided next time) and counts
# towards its block; a permanent one is the input's fault, not the worker's.
FAIL_CHUNK = (
    LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[4], 'attempt_id') ~= ARGV[1] then return -1 end
end_attempt(KEYS[4], ARGV[1], ARGV[2], ARGV[5])
if ARGV[7] == '0' then
  local w = redis.call('HGET', KEYS[4], 'worker')
  add_failed_worker(KEYS[4], w)
  worker_failed(ARGV[9] or '', w, tonumber(ARGV[10] or '0'), tonumber(ARGV[11] or '0'), ARGV[2], ARGV[5])
end
local deliveries = tonumber(redis.call('HGET', KEYS[4], 'deliveries'))
if ARGV[7] == '0' and deliveries < tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[4], 'status', 'PENDING', 'attempt_id', '', 'error', ARGV[5])
  return 1
end
local reason = 'chunk ' .. ARGV[4] .. ': ' .. ARGV[5]
local kind = ARGV[6]
if ARGV[7] == '0' then
  reason = 'chunk ' .. ARGV[4] .. ' failed after ' .. ARGV[8] .. ' attempts: ' .. ARGV[5]
  kind = 'AttemptsExhaustedError'
end
redis.call('HSET', KEYS[4], 'status', 'FAILED', 'attempt_id', '', 'error', reason)
local cur = redis.call('HGET', KEYS[1], 'status')
if not is_finished(cur) then
  set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[3], 'FAILED', ARGV[2], reason, kind)
end
return 0
"""
)

# KEYS: chunk. ARGV: attempt id, now, reason, stale-before (or '' for unconditional), worker key prefix,
# block threshold, block ttl s. -> 1 released, 0 not. A stalled attempt (stale-before given) counts as
# its worker's failure of the chunk, like a crash.
RELEASE = (
    LUA_PRELUDE
    + """
local c = redis.call('HMGET', KEYS[1], 'attempt_id', 'status', 'heartbeat_at', 'worker')
if c[1] ~= ARGV[1] or c[2] ~= 'RUNNING' then return 0 end
if ARGV[4] ~= '' and tonumber(c[3]) >= tonumber(ARGV[4]) then return 0 end
end_attempt(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then
  add_failed_worker(KEYS[1], c[4])
  worker_failed(ARGV[5] or '', c[4], tonumber(ARGV[6] or '0'), tonumber(ARGV[7] or '0'), ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[1], 'error', ARGV[3])
end
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'attempt_id', '')
return 1
"""
)

# KEYS: job, active, finished, chunk keys... ARGV: now, job id.
# -> {'replan'} | {'render', idx...} | {'merge'} | {'refused', status}
RESET_FOR_RETRY = (
    LUA_PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing'} end
if cur ~= 'FAILED' and cur ~= 'CANCELLED' then return {'refused', cur} end
redis.call('HSET', KEYS[1], 'cancel', '0', 'error', '', 'error_kind', '')
redis.call('HDEL', KEYS[1], 'finished_at')
local n = #KEYS - 3
if n == 0 then
  set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'QUEUED', ARGV[1], nil, nil)
  return {'replan'}
end
local todo = {'render'}
local done_frames = 0
for i = 1, n do
  local c = redis.call('HMGET', KEYS[3 + i], 'status', 'hwm', 'index')
  done_frames = done_frames + tonumber(c[2])
  if c[1] ~= 'COMMITTED' then
    redis.call('HSET', KEYS[3 + i], 'status', 'PENDING', 'attempt_id', '', 'deliveries', '0', 'error', '',
      'failed_workers', '[]')
    table.insert(todo, c[3])
  end
end
redis.call('HSET', KEYS[1], 'rate_t0', ARGV[1], 'rate_f0', done_frames)
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'RENDERING', ARGV[1], nil, nil)
if #todo == 1 then return {'merge'} end
return todo
"""
)

# KEYS: job, active, finished. ARGV: now, job id, output uri, output sha256. -> 1 done, 0 not merging
COMPLETE = (
    LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'MERGING' then return 0 end
redis.call('HSET', KEYS[1], 'output_uri', ARGV[3], 'output_sha256', ARGV[4], 'error', '', 'error_kind', '')
set_job_status(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 'COMPLETED', ARGV[1], nil, nil)
return 1
"""
)

# KEYS: lock. ARGV: token, ttl ms. Acquire or extend a lock we already hold.
LOCK = """
local cur = redis.call('GET', KEYS[1])
if cur == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
