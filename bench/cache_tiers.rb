# frozen_string_literal: true

# Cache tiers (issue 16): what each tier of thruster-rs's HTTP cache serves, next to nginx
# `gzip_static` serving the same precompressed file from disk, on loopback. `bench/run` runs it
# last (with its own --quick); alone:
#
#   ruby bench/cache_tiers.rb            REPEAT=3 interleaved repetitions
#   ruby bench/cache_tiers.rb --quick    smoke test: a few seconds per workload; fails on a wrong
#                                        answer (status, body bytes, X-Cache, a hit that reached the
#                                        app, no hit after a restart), never on speed
#
# Per repetition, the peers in turn:
# 1. the 100 KB CSS, gzip-encoded, wrk CONNS connections for DURATION s: req/s of a
#    memory hit (`thrust`, defaults), a disk hit (`thrust`, CACHE_SIZE a few bytes, so memory
#    admits nothing: CACHE_SIZE=0 would turn the disk tier off too) and nginx gzip_static;
# 2. hit latency p50/p99 of the same request on one connection for LAT_DURATION s (a hit's own
#    time, without the queueing of 64 connections on one CPU);
# 3. restart-warm: a fresh `thrust` gets URLS distinct cacheable URLs once, is stopped (SIGTERM
#    flushes pending disk writes) and started again on the same CACHE_DISK_PATH; each URL is asked
#    once more: hits/URLS.
# A Redis row joins once `thrust --help` lists CACHE_REDIS_URL (skipped, with the reason, before).
#
# Appends a "Cache tiers" section to RESULTS/latest.md (replacing an earlier one) and writes
# RESULTS/cache_tiers.json (raw samples); --quick writes under BENCH_WORK/results as bench/run does.

require "json"
require "net/http"
require "fileutils"
require "zlib"
require "rbconfig"
require "etc"
require_relative "support"

QUICK = ARGV.include?("--quick")
ROOT = File.expand_path("..", __dir__)
BENCH_WORK = File.expand_path(ENV.fetch("BENCH_WORK", File.join(ROOT, "tmp", "bench")))
# A directory of its own: bench/run's peers may still run on theirs.
WORK = File.join(BENCH_WORK, "cache_tiers")
RESULTS = QUICK ? File.join(BENCH_WORK, "results") : File.join(ROOT, "bench", "results")
REPEAT = Integer(ENV.fetch("REPEAT", QUICK ? "1" : "3"))
DURATION = Integer(ENV.fetch("DURATION", QUICK ? "2" : "10"))
LAT_DURATION = Integer(ENV.fetch("LAT_DURATION", QUICK ? "1" : "5"))
CONNS = Integer(ENV.fetch("CONNS", "64"))
URLS = Integer(ENV.fetch("URLS", "200"))
SERVER_CPU = ENV.fetch("SERVER_CPU", "0")
CLIENT_CPU = ENV.fetch("CLIENT_CPU", "1")
# "A few bytes": no response body fits, so every hit comes from the disk tier.
DISK_ONLY_CACHE_SIZE = "64"
RESTART_TARGET = 0.9
THRUST = File.join(ROOT, "lib", "thruster", "thrust")
PUMA = Gem.bin_path("puma", "puma")
CSS_PATH = "/assets/app.css"
# Every request names one site: the cache key includes the Host header, port and all, and
# instances on other ports (a restart, a second instance sharing Redis) serve the same site.
HOST = "assets.bench.test"

def fail!(message)
  warn "bench/cache_tiers: #{message}"
  exit 1
end

%w[nginx wrk taskset].each do |tool|
  fail!("#{tool} is missing (bin/setup installs it)") unless system("command -v #{tool} >/dev/null 2>&1")
end
fail!("#{THRUST} is missing: run `bundle exec rake compile`") unless File.executable?(THRUST)
THRUST_HELP = IO.popen([THRUST, "--help"], &:read)
# The Redis tier is measured once the binary has it (issue 16's shared tier).
REDIS_SKIP = if !THRUST_HELP.include?("CACHE_REDIS_URL")
               "thrust --help lists no CACHE_REDIS_URL (the Redis tier is not in this build)"
             elsif !system("command -v redis-server >/dev/null 2>&1")
               fail!("redis-server is missing (bin/setup installs it)")
             end

# ---- fixtures ------------------------------------------------------------------------------
FileUtils.rm_rf(WORK)
FileUtils.mkdir_p(%W[#{WORK}/logs #{WORK}/nginx #{WORK}/public/assets #{RESULTS}])
APP = File.join(ROOT, "bench", "app.ru")
# app.ru wants a download file; nothing here asks for one.
APP_ENV = { "BENCH_BIG" => File::NULL, "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil }.freeze
CSS = IO.popen(APP_ENV, [RbConfig.ruby, "-e", "def run(*) = nil; load ARGV[0]; print CSS", APP], &:read).b
fail!("could not render the benchmark CSS") if CSS.empty?
File.binwrite(File.join(WORK, "public/assets/app.css"), CSS)
Zlib::GzipWriter.open(File.join(WORK, "public/assets/app.css.gz"), 6) { |gz| gz.write(CSS) }

# ---- processes -----------------------------------------------------------------------------
PIDS = [] # rubocop:disable Style/MutableConstant -- every process group started, stopped at exit

def spawn_server(name, env, argv)
  log = File.join(WORK, "logs", "#{name}.log")
  pid = Process.spawn(env, "taskset", "-c", SERVER_CPU, *argv, out: log, err: log, pgroup: true)
  PIDS << pid
  pid
end

def stop(pid)
  Process.kill("TERM", -pid)
  return if BenchSupport.wait_exit(pid, 10)

  Process.kill("KILL", -pid)
  fail!("pid #{pid} did not stop within 10 s of SIGTERM")
rescue Errno::ESRCH
  nil
ensure
  PIDS.delete(pid)
end

at_exit do
  PIDS.each { |pid| Process.kill("TERM", -pid) rescue nil } # rubocop:disable Style/RescueModifier
  PIDS.reject { |pid| BenchSupport.wait_exit(pid, 5) }
      .each { |pid| Process.kill("KILL", -pid) rescue nil } # rubocop:disable Style/RescueModifier
end

PUMA_PORT = BenchSupport.free_port
spawn_server("puma", APP_ENV, [RbConfig.ruby, PUMA, "-e", "production", "-t", "4:4", "-b",
                               "tcp://127.0.0.1:#{PUMA_PORT}", APP])
BenchSupport.wait_for(PUMA_PORT, what: "puma (see #{WORK}/logs)")

# Requests for /assets/* that reached the app: a hit must not add one.
def app_requests = Net::HTTP.get(URI("http://127.0.0.1:#{PUMA_PORT}/bench/asset-requests")).to_i

# redis: the port of the redis-server behind the Redis peer.
Peer = Struct.new(:name, :port, :pid, :tier, :setup, :redis, keyword_init: true)

# `thrust` in front of the shared Puma (its child is a placeholder), with its own STORAGE_PATH:
# a disk cache shared by two peers, or left by an earlier run, would turn misses into hits.
def start_thrust(name, storage, settings = {}, tier: nil, setup: nil)
  env = { "TARGET_PORT" => PUMA_PORT.to_s, "HTTP_PORT" => BenchSupport.free_port.to_s, "LOG_REQUESTS" => "false",
          "BAD_GATEWAY_PAGE" => "/nonexistent", "STORAGE_PATH" => storage }.merge(settings)
  port = Integer(env["HTTP_PORT"])
  pid = spawn_server(name, env, [THRUST, "sleep", "86400"])
  BenchSupport.wait_for(port, what: "#{name} (see #{WORK}/logs)")
  Peer.new(name:, port:, pid:, tier:, setup:)
end

def storage(name) = File.join(WORK, "storage", name)

# GET with Accept-Encoding (so Net::HTTP leaves the body encoded): [status, response, decoded body].
def get(http, path, encoding = "gzip")
  request = Net::HTTP::Get.new(path)
  request["host"] = HOST
  request["accept-encoding"] = encoding
  response = http.request(request)
  body = response.body.to_s.b
  body = Zlib.gunzip(body).b if response["content-encoding"] == "gzip"
  [response.code.to_i, response, body]
end

def connect(port, &) = Net::HTTP.start("127.0.0.1", port, read_timeout: 10, &)

# ---- redis tier ----------------------------------------------------------------------------
# A private redis-server. One `thrust` (memory on: what memory stores is what goes to Redis; no
# disk tier) stores the CSS there; then a fresh one, with memory a few bytes and no disk tier, is
# measured: its hits can only come from Redis.
def redis_call(port, *words)
  TCPSocket.open("127.0.0.1", port) { |s| s.write("#{words.join(' ')}\r\n") && s.gets.to_s.chomp }
rescue SystemCallError
  nil
end

# Entries stored in Redis (not vary records or purge sets).
def redis_entries(port)
  redis_call(port, "EVAL", '"return #redis.call(\'KEYS\', ARGV[1])"', "0", "thruster:v1:[0-9a-f]*").to_s[1..].to_i
end

# Polls the block until it is true (a readiness probe), failing after `timeout` s.
def wait_until(what, timeout = 10)
  deadline = Time.now + timeout
  until yield
    fail!("#{what} within #{timeout} s (see #{WORK}/logs)") if Time.now > deadline
    sleep 0.05
  end
end

def start_redis_peer
  redis_port = BenchSupport.free_port
  spawn_server("redis", {}, ["redis-server", "--port", redis_port.to_s, "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"])
  wait_until("redis-server did not answer PING") { redis_call(redis_port, "PING") == "+PONG" }
  shared = { "CACHE_DISK_PATH" => "none", "CACHE_REDIS_URL" => "redis://127.0.0.1:#{redis_port}" }
  filler = start_thrust("thrust-redis-filler", storage("redis-filler"), shared)
  connect(filler.port) { |http| get(http, CSS_PATH) }
  # Redis is written once the response is complete, in the background.
  wait_until("the Redis filler stored nothing") { redis_entries(redis_port).positive? }
  stop(filler.pid)
  setup = "fresh `thrust`, CACHE_SIZE=#{DISK_ONLY_CACHE_SIZE}, CACHE_DISK_PATH=none, CACHE_REDIS_URL"
  start_thrust("thrust-redis", storage("redis"), shared.merge("CACHE_SIZE" => DISK_ONLY_CACHE_SIZE),
               tier: "redis", setup:).tap { |peer| peer.redis = redis_port }
end

# ---- peers ---------------------------------------------------------------------------------
# nginx's workers run as this user: started as root they would be www-data, which cannot enter
# a checkout under a 0700 directory (/root, `mktemp -d`).
nginx_user = Process.uid.zero? ? "user #{Etc.getpwuid.name} #{Etc.getgrgid(Process.gid).name};" : ""
nginx_port = BenchSupport.free_port
File.write(File.join(WORK, "nginx.conf"), <<~NGINX)
  #{nginx_user}
  worker_processes 1;
  daemon off;
  pid #{WORK}/nginx/nginx.pid;
  error_log #{WORK}/logs/nginx-error.log warn;
  events { worker_connections 4096; }
  http {
    include /etc/nginx/mime.types;
    access_log off;
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_requests 1000000;
    client_body_temp_path #{WORK}/nginx/body; proxy_temp_path #{WORK}/nginx/proxy;
    fastcgi_temp_path #{WORK}/nginx/fcgi; uwsgi_temp_path #{WORK}/nginx/uwsgi; scgi_temp_path #{WORK}/nginx/scgi;
    server {
      listen 127.0.0.1:#{nginx_port};
      location /assets/ { root #{WORK}/public; gzip_static on; }
    }
  }
NGINX
nginx_pid = spawn_server("nginx", {}, ["nginx", "-c", File.join(WORK, "nginx.conf"), "-p", WORK])
BenchSupport.wait_for(nginx_port, path: CSS_PATH, what: "nginx (see #{WORK}/logs)")
NGINX = Peer.new(name: "nginx-gzip_static", port: nginx_port, pid: nginx_pid, tier: "nginx gzip_static",
                 setup: "app.css.gz precompressed on disk, sendfile")
PEERS = [
  start_thrust("thrust-memory", storage("memory"), tier: "memory", setup: "`thrust`, default settings"),
  start_thrust("thrust-disk", storage("disk"), { "CACHE_SIZE" => DISK_ONLY_CACHE_SIZE },
               tier: "disk", setup: "`thrust`, CACHE_SIZE=#{DISK_ONLY_CACHE_SIZE} (memory admits nothing)"),
  (start_redis_peer unless REDIS_SKIP),
  NGINX
].compact.freeze
THRUSTS = PEERS.reject { |p| p.equal?(NGINX) }.freeze

# ---- sanity (what --quick enforces) --------------------------------------------------------
problems = []
PEERS.each do |peer|
  connect(peer.port) do |http|
    # The first request fills the cache (a miss); the next ones must be hits. The Redis peer's
    # first is a hit already: another instance stored the CSS.
    first = get(http, CSS_PATH)[1]["x-cache"]
    problems << "#{peer.name}: first request X-Cache #{first.inspect}, expected hit" if peer.redis && first != "hit"
    get(http, CSS_PATH)
    before = app_requests
    status, response, body = get(http, CSS_PATH)
    problems << "#{peer.name}: #{CSS_PATH} status #{status}" unless status == 200
    problems << "#{peer.name}: #{CSS_PATH} not gzip-encoded" unless response["content-encoding"] == "gzip"
    problems << "#{peer.name}: #{CSS_PATH} body differs from the app's (#{body.bytesize} bytes)" unless body == CSS
    next if peer.equal?(NGINX)

    problems << "#{peer.name}: X-Cache #{response['x-cache'].inspect}, expected hit" unless response["x-cache"] == "hit"
    problems << "#{peer.name}: a hit reached the app" unless app_requests == before
  end
end
unless problems.empty?
  warn problems.map { |p| "bench/cache_tiers: sanity: #{p}" }.join("\n")
  exit 1
end
warn "bench/cache_tiers: sanity checks passed for #{PEERS.map(&:name).join(', ')}"

# ---- restart-warm --------------------------------------------------------------------------
# URLS distinct assets through a fresh `thrust`, which is stopped (SIGTERM: pending disk writes
# are flushed) and started again on the same CACHE_DISK_PATH; then each URL once more. A hit
# after the restart can only come from the disk tier (memory starts empty).
def restart_warm(rep, problems)
  dir = storage("restart-#{rep}")
  paths = Array.new(URLS) { |i| "/assets/n/#{i}.css" }
  expected = app_bodies(paths)
  # The same port, as a restart has.
  port = fill(dir, paths, rep)
  before = app_requests
  peer = start_thrust("thrust-restart-#{rep}b", dir, { "HTTP_PORT" => port.to_s })
  started = Time.now
  labels = connect(peer.port) { |http| paths.zip(expected).map { |path, bytes| warm_get(http, path, bytes, problems) } }
  seconds = Time.now - started
  stop(peer.pid)
  check_warm(labels, app_requests - before, problems)
  { hits: labels.count("hit"), urls: URLS, seconds: seconds.round(3), labels: labels.tally }
end

def check_warm(labels, contacted, problems)
  misses = URLS - labels.count("hit")
  # Not a speed: every entry was complete and flushed before the restart.
  if misses > URLS * (1 - RESTART_TARGET)
    problems << "restart-warm: #{URLS - misses}/#{URLS} hits, below #{(RESTART_TARGET * 100).round}%"
  end
  problems << "restart-warm: #{contacted} app requests for #{misses} misses" unless contacted == misses
  # The first request after a restart is already a hit (the disk tier finds entries by key
  # before its index is loaded).
  problems << "restart-warm: the first request after the restart: #{labels.first.inspect}" if labels.first != "hit"
end

# What the app itself sends for paths.
def app_bodies(paths) = connect(PUMA_PORT) { |http| paths.map { |path| get(http, path, "identity")[2] } }

# The first life of the restarted proxy: each URL once (misses, stored), then SIGTERM. Its port.
def fill(dir, paths, rep)
  peer = start_thrust("thrust-restart-#{rep}a", dir)
  connect(peer.port) { |http| paths.each { |path| get(http, path) } }
  stop(peer.pid)
  peer.port
end

# One request after the restart; its X-Cache.
def warm_get(http, path, bytes, problems)
  status, response, body = get(http, path)
  problems << "restart-warm: #{path} status #{status}" unless status == 200
  problems << "restart-warm: #{path} body differs from the app's" unless body == bytes
  response["x-cache"]
end

# ---- runs ----------------------------------------------------------------------------------
# gzip (what browsers get) and identity (the tier's own cost, no encoding chosen per request).
def measure(peer)
  url = "http://127.0.0.1:#{peer.port}#{CSS_PATH}"
  gzip = { "Host" => HOST, "Accept-Encoding" => "gzip" }
  identity = { "Host" => HOST, "Accept-Encoding" => "identity" }
  load = BenchSupport.wrk(url, conns: CONNS, duration: DURATION, headers: gzip, cpu: CLIENT_CPU)
  plain = BenchSupport.wrk(url, conns: CONNS, duration: DURATION, headers: identity, cpu: CLIENT_CPU)
  one = BenchSupport.wrk(url, conns: 1, duration: LAT_DURATION, headers: gzip, cpu: CLIENT_CPU)
  one_plain = BenchSupport.wrk(url, conns: 1, duration: LAT_DURATION, headers: identity, cpu: CLIENT_CPU)
  runs = [load, plain, one, one_plain]
  { rps: load[:rps], identity_rps: plain[:rps], loaded_p99: load[:p99], p50: one[:p50], p99: one[:p99],
    identity_p50: one_plain[:p50], identity_p99: one_plain[:p99],
    non2xx: runs.sum { |r| r[:non2xx] }, socket_errors: runs.sum { |r| r[:socket_errors] },
    requests: runs.sum { |r| r[:requests] } }
end

samples = Hash.new { |h, k| h[k] = [] }
REPEAT.times do |rep|
  PEERS.each do |peer|
    warn "bench/cache_tiers: repetition #{rep + 1}/#{REPEAT}: #{peer.name}"
    before = app_requests
    sample = measure(peer)
    sample[:app_requests] = app_requests - before
    samples[peer.name] << sample
    problems << "#{peer.name}: #{sample[:non2xx]} answers not 2xx/3xx" if sample[:non2xx].positive?
    if sample[:requests].zero?
      problems << "#{peer.name}: wrk made no request"
    # A Redis lookup slower than CACHE_REDIS_TIMEOUT_MS is a miss by design (its count is in the
    # table); a memory or disk hit has no such way out.
    elsif !peer.equal?(NGINX) && !peer.redis && sample[:app_requests].positive?
      problems << "#{peer.name}: #{sample[:app_requests]} of its hits reached the app"
    end
  end
  warn "bench/cache_tiers: repetition #{rep + 1}/#{REPEAT}: restart-warm (#{URLS} URLs)"
  samples["restart-warm"] << restart_warm(rep, problems)
end

# The disk peer's hits came from disk: with its entry files gone the CSS is a miss (the memory
# peer, which keeps it in memory, still hits); the Redis peer's from Redis: flushed, a miss.
THRUSTS.each do |peer|
  if peer.redis
    redis_call(peer.redis, "FLUSHALL") == "+OK" or problems << "#{peer.name}: FLUSHALL failed"
  else
    cache = File.join(storage(peer.tier), "cache")
    Dir.glob(File.join(cache, "**", "*")).each { |f| File.delete(f) if File.file?(f) }
  end
  before = app_requests
  label = connect(peer.port) { |http| get(http, CSS_PATH)[1]["x-cache"] }
  contacted = app_requests - before
  expected = peer.tier == "memory" ? ["hit", 0] : ["miss", 1]
  next if expected == [label, contacted]

  emptied = peer.redis ? "Redis flushed" : "disk entries deleted"
  problems << "#{peer.name}: with its #{emptied}: X-Cache #{label.inspect}, #{contacted} app requests " \
              "(expected #{expected.first}, #{expected.last})"
end

# ---- report --------------------------------------------------------------------------------
def stat(list, field)
  values = list.map { |s| s[field] }.compact
  return nil if values.empty?

  m = BenchSupport.median(values)
  [m, m.to_f.positive? ? (values.max - values.min) / 2.0 / m * 100 : 0]
end

# The spread only for req/s: a latency median of 0.1 ms next to one repetition's 50 ms (another
# process took the CPU) gives a "±" that says nothing.
def fmt(pair, digits = 0, spread: digits.zero?)
  return "–" unless pair

  value, half = pair
  text = format("%.#{digits}f", value)
  spread && half >= 1 && REPEAT > 1 ? "#{text} ±#{half.round}%" : text
end

# Against nginx per repetition (the two ran close together), then the median.
def ratio(list, base, field = :rps)
  ratios = list.zip(base).map { |s, b| s[field] / b[field] if b && b[field].positive? }.compact
  ratios.empty? ? "–" : format("%.2f×", BenchSupport.median(ratios))
end

rows = PEERS.map do |peer|
  s = samples[peer.name]
  nginx = samples[NGINX.name]
  "| #{peer.tier} | #{peer.setup} | #{fmt(stat(s, :rps))} | #{ratio(s, nginx)} | #{fmt(stat(s, :identity_rps))} | " \
    "#{ratio(s, nginx, :identity_rps)} | " \
    "#{fmt(stat(s, :p50), 3)} / #{fmt(stat(s, :p99), 2)} | " \
    "#{fmt(stat(s, :identity_p50), 3)} / #{fmt(stat(s, :identity_p99), 2)} | #{fmt(stat(s, :loaded_p99), 2)} | " \
    "#{peer.equal?(NGINX) ? '–' : s.sum { |x| x[:app_requests] }} |"
end
rows.insert(2, "| redis | skipped: #{REDIS_SKIP} |#{' – |' * 8}") if REDIS_SKIP
warm = samples["restart-warm"]
warm_ratio = BenchSupport.median(warm.map { |w| w[:hits].to_f / w[:urls] })
warm_line = "Restart-warm: #{URLS} distinct ~8 KB assets (gzip) through a fresh `thrust`, SIGTERM, `thrust` " \
            "started again on the same CACHE_DISK_PATH, each URL asked once: " \
            "**#{format('%.1f%%', warm_ratio * 100)}** hits (median; per " \
            "repetition #{warm.map { |w| "#{w[:hits]}/#{w[:urls]}" }.join(', ')}; target ≥ " \
            "#{(RESTART_TARGET * 100).round}%), the #{URLS} requests after the restart in " \
            "#{warm.map { |w| format('%.2f s', w[:seconds]) }.join(', ')} on one connection."
slow = PEERS.map { |peer| [peer.name, samples[peer.name].sum { |x| x[:socket_errors] }] }.reject { |_, n| n.zero? }
slow_line = if slow.any?
              "wrk socket errors (connect/read/write/its 2 s timeout: slow answers, not wrong ones): " \
                "#{slow.map { |name, n| "#{name} #{n}" }.join(', ')}."
            end
machine = "#{Etc.nprocessors} CPUs, #{File.read('/proc/loadavg').split.first} load"
section = <<~MD

  ## Cache tiers

  #{Time.now.utc.strftime('%Y-%m-%d %H:%M UTC')} — #{QUICK ? 'QUICK smoke run (not a measurement)' : 'full run'} of `bench/cache_tiers.rb`;
  median of #{REPEAT} interleaved repetitions (±: half the spread). The 100 KB CSS with `Accept-Encoding: gzip`:
  req/s with wrk, #{CONNS} connections, #{DURATION} s (×: median of the per-repetition ratios to nginx);
  identity: the same without compression (nginx sends app.css itself with sendfile);
  hit latency p50 / p99 with wrk on 1 connection, #{LAT_DURATION} s each, gzip and identity (loaded p99: the
  #{CONNS}-connection gzip run's).
  Servers on CPU #{SERVER_CPU} (with Puma), wrk on CPU #{CLIENT_CPU}; #{machine} at the end.
  Versions: #{`nginx -v 2>&1`.strip}, thruster-rs #{`#{THRUST} --version`.split.last}.

  | tier | setup | css gzip req/s | ×gzip_static | css identity req/s | ×nginx | gzip hit ms p50 / p99 | identity hit ms p50 / p99 | loaded p99 ms | app requests (all runs) |
  |---|---|---|---|---|---|---|---|---|---|
  #{rows.join("\n")}

  #{warm_line}
  #{slow_line}
  #{problems.empty? ? '' : "\nProblems:\n#{problems.map { |p| "- #{p}" }.join("\n")}\n"}
MD
puts section
latest = File.join(RESULTS, "latest.md")
previous = File.exist?(latest) ? File.read(latest).sub(/\n## Cache tiers\n.*\z/m, "") : ""
File.write(latest, previous.empty? ? section.lstrip : previous.chomp + section)
File.write(File.join(RESULTS, "cache_tiers.json"),
           JSON.pretty_generate(samples.merge("redis_skipped" => REDIS_SKIP, "problems" => problems)))
unless problems.empty?
  warn problems.map { |p| "bench/cache_tiers: #{p}" }.join("\n")
  exit 1
end
