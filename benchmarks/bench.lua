-- wrk script for the kvstore benchmarks (benchmarks/loadgen.py drives it; see its docstring).
--
-- Why one script configured by environment variables: wrk's Lua states (one per thread plus
-- the main one) all see the process environment, so the driver can set ports, op, rate and
-- bounds without generating Lua, and `setup` (main state) can spread threads over nodes.
--
--   KVB_TARGET   kvstore | etcd
--   KVB_OP       put | get
--   KVB_PORTS    comma-separated 127.0.0.1 ports; thread i talks to port i mod #ports
--   KVB_QUERY    kvstore query string without '?', e.g. "w=2" or "consistency=quorum"
--   KVB_SIZE     value size in bytes (put)
--   KVB_PREFIX   key prefix; put keys are PREFIX..(thread + n*threads): unique, and a run of
--                K puts per thread covers PREFIX0 .. PREFIX(K*threads-1) exactly
--   KVB_KEYS     get: keys are PREFIX..random(0, KEYS-1)
--   KVB_COUNT    a thread is done after this many responses (0: only the -d time bound)
--   KVB_STOP     first | all: end the whole run (SIGINT to wrk itself, which then prints
--                its results with the true elapsed time) when the first thread is done
--                (throughput runs: every thread stays busy until the end) or when all are
--                (loading a key range that must be complete).  wrk alone would only stop a
--                thread and still sleep until -d; this is how the op-count bound works.
--   KVB_RATE     requests/s per thread, paced on an absolute schedule (0: closed loop)
--   KVB_THREADS  number of wrk threads (for the key arithmetic)
--   KVB_SECRET   unused by the data path; kept so admin calls could share the script

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } kvb_timespec;
int clock_gettime(int clk_id, kvb_timespec *tp);
int kill(int pid, int sig);
int getpid(void);
]]
local SIGINT = 2
local CLOCK_MONOTONIC = 1
local ts = ffi.new("kvb_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000.0 + tonumber(ts.tv_nsec) / 1e6
end

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local target = env("KVB_TARGET", "kvstore")
local op = env("KVB_OP", "put")
local query = env("KVB_QUERY", "")
local size = tonumber(env("KVB_SIZE", "100"))
local prefix = env("KVB_PREFIX", "bench-")
local nkeys = tonumber(env("KVB_KEYS", "1000"))
local limit = tonumber(env("KVB_COUNT", "0"))
local rate = tonumber(env("KVB_RATE", "0"))
local nthreads = tonumber(env("KVB_THREADS", "1"))
local stop_mode = env("KVB_STOP", "first")

-- base64 (etcd's JSON gateway takes keys and values as base64 strings)
local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(data)
  return ((data:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

-- main state: spread threads over the nodes -----------------------------------------------
local addrs = nil
local thread_index = 0
local threads = {}
-- One "done" flag per thread, shared by address: all Lua states live in the wrk process.
local done_flags = ffi.new("int[?]", nthreads + 1)
local done_flags_addr = tonumber(ffi.cast("intptr_t", done_flags))
function setup(thread)
  if addrs == nil then
    addrs = {}
    for port in string.gmatch(env("KVB_PORTS", "8000"), "[^,]+") do
      local found = wrk.lookup("127.0.0.1", port)
      addrs[#addrs + 1] = found[1]
    end
  end
  thread.addr = addrs[(thread_index % #addrs) + 1]
  thread:set("tid", thread_index)
  thread:set("flags", done_flags_addr)
  threads[#threads + 1] = thread
  thread_index = thread_index + 1
end

-- thread states --------------------------------------------------------------------------
local tid = 0
local n = 0
local responses = 0
local value = nil
local value_b64 = nil
local next_slot = 0
local flags = nil
statuses = {}  -- global: read from the main state by done() through thread:get

function init(args)
  tid = tonumber(wrk.thread:get("tid")) or 0
  flags = ffi.cast("volatile int *", wrk.thread:get("flags"))
  value = string.rep("v", size)
  value_b64 = b64(value)
  math.randomseed(tid * 7919 + 17)
  next_slot = now_ms()
end

local function next_key()
  if op == "put" then
    local k = prefix .. tostring(tid + n * nthreads)
    n = n + 1
    return k
  end
  return prefix .. tostring(math.random(0, nkeys - 1))
end

local kv_headers = { ["Content-Type"] = "application/octet-stream" }
local json_headers = { ["Content-Type"] = "application/json" }

function request()
  local key = next_key()
  if target == "etcd" then
    if op == "put" then
      return wrk.format("POST", "/v3/kv/put", json_headers,
        '{"key":"' .. b64(key) .. '","value":"' .. value_b64 .. '"}')
    end
    return wrk.format("POST", "/v3/kv/range", json_headers, '{"key":"' .. b64(key) .. '"}')
  end
  local path = "/kv/" .. key
  if query ~= "" then path = path .. "?" .. query end
  if op == "put" then
    return wrk.format("PUT", path, kv_headers, value)
  end
  return wrk.format("GET", path, nil, nil)
end

local function finished()
  flags[tid] = 1
  if stop_mode == "all" then
    for i = 0, nthreads - 1 do
      if flags[i] == 0 then
        wrk.thread:stop()
        return
      end
    end
  end
  if flags[nthreads] == 0 then
    flags[nthreads] = 1
    ffi.C.kill(ffi.C.getpid(), SIGINT)
  end
end

function response(status, headers, body)
  local s = tostring(status)
  statuses[s] = (statuses[s] or 0) + 1
  responses = responses + 1
  if limit > 0 then
    if responses == limit then
      finished()
    elseif flags[nthreads] ~= 0 then
      -- the run is over: stop now rather than at wrk's next 100 ms stop check
      wrk.thread:stop()
    end
  end
end

if rate > 0 then
  -- Absolute schedule per thread: each request takes the next free slot, so a slow reply
  -- does not lower the offered rate as long as enough connections are idle.
  local interval = 1000.0 / rate
  function delay()
    local t = now_ms()
    local slot = next_slot
    if slot < t then slot = t end
    next_slot = slot + interval
    return math.floor(slot - t)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local merged = {}
  for _, t in ipairs(threads) do
    local st = t:get("statuses")
    if st then
      for code, count in pairs(st) do merged[code] = (merged[code] or 0) + count end
    end
  end
  local parts = {}
  for code, count in pairs(merged) do parts[#parts + 1] = string.format('"%s":%d', code, count) end
  io.write(string.format(
    'KVB_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"statuses":{%s},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ","),
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
